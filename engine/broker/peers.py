"""Which connection a ROUTER's routing id talks over, so that a closed connection (a socket
monitor event, which names only a file descriptor) tells which client or worker left."""

from __future__ import annotations

import logging
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

MONITOR_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_LOG_EVERY_S = 10.0


class PeerTracker:
    """Maps routing ids to the file descriptors their frames arrive on (``ZMQ_SRCFD``).

    libzmq reuses a closed connection's descriptor for the next one, and reports the close on
    the monitor socket before the descriptor can be reused. So: before binding a routing id seen
    for the first time, read the monitor (``needs_bind`` says when); then a close event always
    names the connection currently bound to its descriptor.
    """

    def __init__(self, name: str, curve: bool = False) -> None:
        self.name = name
        self.curve = curve  # the broker speaks CURVE: a failed handshake may be a wrong key
        self._by_fd: dict[int, bytes] = {}
        self._fd_of: dict[bytes, int] = {}
        self._logged_at = -_LOG_EVERY_S
        self.num_refused = 0

    def needs_bind(self, routing_id: bytes) -> bool:
        return routing_id not in self._fd_of

    def bind(self, routing_id: bytes, fd: int) -> None:
        old = self._by_fd.get(fd)
        if old is not None:
            self._fd_of.pop(old, None)
        self._by_fd[fd] = routing_id
        self._fd_of[routing_id] = fd

    def on_event(self, frames: list[bytes]) -> bytes | None:
        """Handle one monitor message; returns the routing id whose connection closed, if any."""
        event = parse_monitor_message(frames)
        kind, value = event["event"], int(event["value"])
        if kind == zmq.EVENT_DISCONNECTED:
            routing_id = self._by_fd.pop(value, None)
            if routing_id is not None:
                self._fd_of.pop(routing_id, None)
            return routing_id
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not self.curve:
            # Without CURVE this is a connection that closed during its handshake (a client
            # that exited at once, a port probe): nothing to act on, so not a warning.
            log.debug("a connection on the %s socket closed during its handshake", self.name)
        elif kind in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            self.num_refused += 1
            why = (
                "the peer does not speak CURVE with this broker's key"
                if self.curve
                else "the peer speaks another protocol or socket type (HTTP, a CURVE client, "
                "a SUB socket on the client port?)"
            )
            self._log_refusal(f"handshake failed (ZMTP error {value:#x}): {why}")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.num_refused += 1  # the authenticator logged the key
        return None

    def _log_refusal(self, why: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning("refused a connection on the %s socket: %s", self.name, why)
