"""The broker's one owner of where each request's parked KV cache is: which worker holds it, in
which tier (device or host), how many bytes, and which handoff is in flight. Nothing else keeps
a copy of these facts. Every event goes through one method, which updates them together and
returns the commands the broker must send (DropKV to a holder), so no two structures can drift
apart: a lost worker, for example, forgets what it held and what was pulled from it at once.
Decisions are the policy's (which requests move, with ``handoff_ids``); this only records them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from engine import protocol as p

Tier = Literal["device", "host"]
Command = tuple[str, p.DropKV]  # (worker id, message)


@dataclass(slots=True)
class Parked:
    worker_id: str
    tier: Tier
    nbytes: int


class KVLedger:
    def __init__(self) -> None:
        self._parked: dict[str, Parked] = {}  # request id -> where its KV waits
        self._by_worker: defaultdict[str, set[str]] = defaultdict(set)  # holder -> request ids
        self._pulling: dict[str, str] = {}  # request id -> worker it is pulled from

    # -- queries -------------------------------------------------------------------------------

    def holder(self, request_id: str) -> str | None:
        entry = self._parked.get(request_id)
        return None if entry is None else entry.worker_id

    def on_host(self, request_id: str) -> bool:
        entry = self._parked.get(request_id)
        return entry is not None and entry.tier == "host"

    def parked_bytes(self, worker_id: str) -> int:
        """KV parked on this worker's device (what its next batches may have to evict)."""
        return sum(
            e.nbytes
            for rid in self._by_worker.get(worker_id, ())
            if (e := self._parked[rid]).tier == "device"
        )

    def parked_ids(self, worker_id: str) -> set[str]:
        return set(self._by_worker.get(worker_id, ()))

    # -- events --------------------------------------------------------------------------------

    def parked(self, request_id: str, worker_id: str, nbytes: int) -> list[Command]:
        """A slice ended with the request's KV kept on ``worker_id``'s device."""
        commands = self._drop(request_id)
        self._parked[request_id] = Parked(worker_id, "device", nbytes)
        self._by_worker[worker_id].add(request_id)
        return [c for c in commands if c[0] != worker_id]

    def evicted(self, worker_id: str, request_ids: list[str], offloaded: bool) -> None:
        """The holder moved parked KV to its host tier (``offloaded``) or freed it."""
        for request_id in request_ids:
            entry = self._parked.get(request_id)
            if entry is None or entry.worker_id != worker_id:
                continue
            if offloaded:
                entry.tier = "host"
            else:
                self._remove(request_id)

    def dispatched(
        self, request_id: str, worker_id: str, handoff: bool
    ) -> tuple[str, list[Command]]:
        """The request runs next on ``worker_id``. Returns the worker its KV is pulled from (""
        for none) and what to send: KV it leaves behind on another worker is freed there unless
        the policy chose a handoff (then the puller takes it)."""
        entry = self._parked.get(request_id)
        if entry is None or entry.worker_id == worker_id:
            if entry is not None:
                self._remove(request_id)  # the worker reuses it; it is live again
            return "", []
        if handoff:
            self._remove(request_id)
            self._pulling[request_id] = entry.worker_id
            return entry.worker_id, []
        return "", self._drop(request_id)

    def settle(self, request_id: str) -> list[Command]:
        """The batch that pulled the request's KV released it: whatever the holder still has of
        it (the pull failed or never came) is freed there."""
        source = self._pulling.pop(request_id, None)
        return [] if source is None else [(source, p.DropKV(request_ids=[request_id]))]

    def forget(self, request_id: str) -> list[Command]:
        """The request ended: free its KV wherever it is."""
        return self._drop(request_id) + self.settle(request_id)

    def worker_lost(self, worker_id: str) -> None:
        """Everything it held is gone, and nothing can be pulled from it any more."""
        for request_id in list(self._by_worker.get(worker_id, ())):
            self._remove(request_id)
        self._by_worker.pop(worker_id, None)
        for request_id in [r for r, w in self._pulling.items() if w == worker_id]:
            del self._pulling[request_id]

    # -- internals -----------------------------------------------------------------------------

    def _drop(self, request_id: str) -> list[Command]:
        entry = self._remove(request_id)
        if entry is None:
            return []
        return [(entry.worker_id, p.DropKV(request_ids=[request_id]))]

    def _remove(self, request_id: str) -> Parked | None:
        entry = self._parked.pop(request_id, None)
        if entry is not None:
            self._by_worker[entry.worker_id].discard(request_id)
        return entry
