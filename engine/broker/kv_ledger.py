"""The broker's view of parked KV beyond its holder: which tier it is in (device or host), and
the handoffs in flight, so that a request moved to another worker either pulls its KV from the
holder or has it freed there (it then recomputes). Decisions are the policy's (handoff_ids)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine import protocol as p

if TYPE_CHECKING:
    from engine.broker.core import BrokerCore
    from engine.broker.requests import Request
    from engine.scheduler.base import Dispatch


class KVLedger:
    def __init__(self) -> None:
        self.on_host: set[str] = set()  # request ids whose parked KV is in the holder's host tier
        self.handoff_from: dict[str, str] = {}  # request id -> worker it pulls its KV from

    def kv_source(self, core: BrokerCore, req: Request, d: Dispatch) -> str:
        """Where the worker of ``d`` pulls ``req``'s KV from ("" for nowhere): its holder, when
        the policy chose a handoff and the holder announced a peer address; otherwise KV parked
        on another worker is freed there (the request recomputes)."""
        holder_id = req.kv_worker_id
        if holder_id is None or holder_id == d.worker_id:
            return ""
        holder = core.workers.get(holder_id)
        if holder is None or req.request_id not in d.handoff_ids or not holder.ready.peer_addr:
            self.drop(core, req)
            return ""
        holder.parked.pop(req.request_id, None)
        self.on_host.discard(req.request_id)
        self.handoff_from[req.request_id] = holder_id
        req.kv_worker_id = None
        return holder.ready.peer_addr

    def drop(self, core: BrokerCore, req: Request) -> None:
        """Free ``req``'s KV on its holder (it moved elsewhere without a handoff, or ended)."""
        holder = core.workers.get(req.kv_worker_id) if req.kv_worker_id else None
        if holder is not None:
            holder.parked.pop(req.request_id, None)
            core._send(holder, p.DropKV(request_ids=[req.request_id]))
        req.kv_worker_id = None
        self.on_host.discard(req.request_id)

    def settle(self, core: BrokerCore, request_id: str) -> None:
        """The batch that pulled ``request_id``'s KV released it: whatever the holder still has
        of it (the pull failed or never came) is freed there."""
        holder_id = self.handoff_from.pop(request_id, None)
        holder = core.workers.get(holder_id) if holder_id else None
        if holder is not None:
            core._send(holder, p.DropKV(request_ids=[request_id]))

    def moved(self, request_ids: list[str], offloaded: bool) -> None:
        """A holder moved parked KV to its host tier (``offloaded``) or freed it."""
        if offloaded:
            self.on_host.update(request_ids)
        else:
            self.on_host.difference_update(request_ids)

    def forget(self, core: BrokerCore, request_id: str) -> None:
        self.on_host.discard(request_id)
        self.settle(core, request_id)
