"""Replies on their way to clients: sent without ever blocking the broker, held (in order) for a
client that does not read, never dropped while they belong to a live request."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import zmq

from engine import protocol as p

log = logging.getLogger(__name__)

Reply = p.Accepted | p.Delta | p.Finished | p.Error | p.StatsSnapshot


@dataclass(slots=True)
class _Backlog:
    """One client's replies that its socket queue could not take yet."""

    items: deque[tuple[Reply, bool]] = field(default_factory=deque)  # (reply, droppable)
    open_deltas: dict[str, p.Delta] = field(default_factory=dict)  # request -> its last, if a Delta
    num_droppable: int = 0


class ClientOutbox:
    """Sends replies on the client ROUTER (``ZMQ_ROUTER_MANDATORY``, so a full queue raises
    instead of dropping). What a client's queue cannot take waits here in order; a waiting Delta
    absorbs the next Delta of its request, so a slow client costs at most a few messages per live
    request. ``droppable`` replies (answers to bad frames, stats) beyond ``max_droppable`` per
    client are dropped: a peer that floods without reading cannot grow the broker's memory."""

    def __init__(self, sock: zmq.Socket, max_droppable: int = 64) -> None:
        self._sock = sock
        self.max_droppable = max_droppable
        self._backlogs: dict[bytes, _Backlog] = {}
        self.num_dropped = 0

    @property
    def num_waiting(self) -> int:
        return sum(len(b.items) for b in self._backlogs.values())

    def send(self, client_id: bytes, reply: Reply, droppable: bool = False) -> None:
        backlog = self._backlogs.get(client_id)
        if backlog is None:
            if self._try_send(client_id, reply) is not False:
                return
            backlog = self._backlogs[client_id] = _Backlog()
        self._hold(backlog, reply, droppable)

    def _hold(self, backlog: _Backlog, reply: Reply, droppable: bool) -> None:
        request_id = getattr(reply, "request_id", None)
        if isinstance(reply, p.Delta):
            pending = backlog.open_deltas.get(reply.request_id)
            if pending is not None:  # same request, nothing of it after: merge, order intact
                pending.text += reply.text
                pending.token_ids.extend(reply.token_ids)
                return
            reply = p.Delta(
                request_id=reply.request_id, text=reply.text, token_ids=list(reply.token_ids)
            )
            backlog.open_deltas[reply.request_id] = reply
        elif request_id is not None:
            backlog.open_deltas.pop(request_id, None)
        if droppable:
            if backlog.num_droppable >= self.max_droppable:
                self.num_dropped += 1
                return
            backlog.num_droppable += 1
        backlog.items.append((reply, droppable))

    def flush(self) -> None:
        """Send what waits, for every client whose queue has room again."""
        for client_id in list(self._backlogs):
            backlog = self._backlogs[client_id]
            while backlog.items:
                reply, droppable = backlog.items[0]
                sent = self._try_send(client_id, reply)
                if sent is False:
                    break
                backlog.items.popleft()
                backlog.num_droppable -= droppable
                if (
                    isinstance(reply, p.Delta)
                    and backlog.open_deltas.get(reply.request_id) is reply
                ):
                    del backlog.open_deltas[reply.request_id]
                if sent is None:  # the client is gone
                    backlog.items.clear()
            if not backlog.items:
                del self._backlogs[client_id]

    def forget(self, client_id: bytes) -> None:
        """The client's connection closed: what waits for it can never be delivered."""
        self._backlogs.pop(client_id, None)

    def _try_send(self, client_id: bytes, reply: Reply) -> bool | None:
        """True: queued on the socket; False: its queue is full; None: no such peer (gone)."""
        try:
            self._sock.send_multipart([client_id, p.encode(reply)], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return None
