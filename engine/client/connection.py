"""The client's DEALER socket to the broker, and a monitor that says whether a peer is there."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engine.addresses import connect_address
from engine.client.errors import Disconnected
from engine.curve import ClientKeys
from engine.links import reconnect_backoff

log = logging.getLogger(__name__)

DEFAULT_ADDR = "tcp://127.0.0.1:5555"
_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
# ZMTP heartbeats notice a broker host that vanished without closing its TCP connection.
_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 5000


class Connection:
    """One DEALER socket connected to ``addr`` (ZeroMQ reconnects by itself, with backoff:
    engine/links.py) and its monitor.

    ``connected`` is True while a peer that completed the ZeroMQ handshake is attached.
    Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        addr: str,
        *,
        send_timeout_s: float,
        context: zmq.asyncio.Context | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        self.addr = addr = connect_address(addr, DEFAULT_ADDR)  # HOST:PORT too; AddressError
        self.send_timeout_s = send_timeout_s
        self.connected = False
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        reconnect_backoff(self._sock)
        self._monitor = self._sock.get_monitor_socket(_MONITOR_EVENTS)
        self._monitor.linger = 0
        if curve is not None:  # a broker started with --curve (docs/PROTOCOL.md, section 12)
            curve.apply(self._sock)
        try:
            self._sock.connect(addr)
        except zmq.ZMQError as exc:
            self.close()
            raise ValueError(
                f"cannot connect to {addr!r} ({exc}): pass an address such as {DEFAULT_ADDR!r}"
            ) from None

    async def send(self, frame: bytes, request_id: str | None = None) -> None:
        """Queue one frame; raises Disconnected if the queue stays full for send_timeout_s."""
        try:
            await asyncio.wait_for(self._sock.send(frame), self.send_timeout_s)
        except TimeoutError:
            raise Disconnected(
                self.addr,
                f"could not send to {self.addr} within {self.send_timeout_s:g} s: the send "
                "queue is full because no broker has been reachable there. Start one with "
                "`python run.py serve`.",
                request_id,
            ) from None

    def send_nowait(self, frame: bytes) -> None:
        """Queue a frame without waiting (a Cancel); if the queue is full it is dropped, logged."""
        level = logging.WARNING if self.connected else logging.DEBUG  # no broker: nothing to stop
        try:
            self._sock.send(frame, zmq.NOBLOCK).add_done_callback(
                lambda future: _log_send_failure(future, level)
            )
        except zmq.ZMQError as exc:
            log.log(level, "could not queue a frame for %s: %s", self.addr, exc)

    async def read_forever(
        self,
        on_frame: Callable[[bytes], None],
        on_lost: Callable[[], None],
        on_back: Callable[[], None] = lambda: None,
    ) -> None:
        """Hand every received frame to ``on_frame``; call ``on_lost`` when the connected peer
        goes away, after the frames it sent before, and ``on_back`` when a peer completes the
        handshake after such a loss (ZeroMQ reconnected: the same broker, or a restarted one)."""
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        lost = False
        while True:
            await poller.poll()
            await self._drain(on_frame)
            while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:
                event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.connected = True
                    if lost:
                        lost = False
                        on_back()
                elif event == zmq.EVENT_DISCONNECTED and self.connected:
                    self.connected, lost = False, True
                    await self._drain(on_frame)
                    on_lost()

    async def _drain(self, on_frame: Callable[[bytes], None]) -> None:
        while self._sock.get(zmq.EVENTS) & zmq.POLLIN:
            on_frame(await self._sock.recv())

    def close(self) -> None:
        """Close both sockets with linger 0 (and the context if this object made it)."""
        if not self._sock.closed:
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._own_context and not self._ctx.closed:
            self._ctx.term()


def _log_send_failure(future: asyncio.Future, level: int = logging.WARNING) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.log(level, "could not queue a frame: %s", future.exception())
