"""How a dispatched request gets its KV cache back instead of recomputing it: from this worker's
store (device tier as is, host tier restored) or from a peer (a handoff this worker awaits), and
the counters of each path. No I/O: handoff arrivals and failures are handed in by the caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import protocol as p
from engine.worker.dispatch import DispatchStats
from engine.worker.kv_pool import Layers
from engine.worker.kv_store import KVStore, ParkedKV, to_device

log = logging.getLogger(__name__)

DEFAULT_HANDOFF_WAIT_S = 30.0  # backstop: the handoff thread fails a fetch long before this


@dataclass(frozen=True, slots=True)
class KVArrived:
    """A handed-off KV cache, checked against the request's context; CPU tensors."""

    request_id: str
    token_ids: tuple[int, ...]
    layers: Layers
    nbytes: int
    elapsed_s: float  # from the fetch request to the checked arrival
    peer: str


@dataclass(frozen=True, slots=True)
class KVFetchFailed:
    request_id: str
    reason: str


class KVIntake:
    """Awaited handoffs and the reuse of parked KV for rows about to start."""

    def __init__(
        self,
        store: KVStore,
        device: torch.device,
        wait_s: float = DEFAULT_HANDOFF_WAIT_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.device = device
        self.wait_s = wait_s
        self._clock = clock
        self._awaited: dict[str, float] = {}  # request id -> give up at (clock seconds)

    def expect(self, run: p.RunBatch) -> None:
        """Items that name a peer wait for their KV before they start (a sequential batch as a
        whole; a join on its own, while the running set steps on)."""
        until = self._clock() + self.wait_s
        for item in run.items:
            if item.kv_source:
                self._awaited[item.request_id] = until

    def arrived(self, msg: KVArrived) -> bool:
        """Park an awaited arrival on the device tier (True); an unawaited (late) one is
        dropped (False)."""
        if self._awaited.pop(msg.request_id, None) is None:
            log.info("dropped the KV of %s handed off too late", msg.request_id)
            return False
        layers = to_device(msg.layers, self.device)
        self.store.park(
            msg.request_id, msg.token_ids, layers, msg.peer, (msg.nbytes, msg.elapsed_s)
        )
        return True

    def failed(self, msg: KVFetchFailed) -> None:
        if self._awaited.pop(msg.request_id, None) is not None:
            log.warning("handoff of %s failed (%s); it is recomputed", msg.request_id, msg.reason)

    def cancel(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            self._awaited.pop(request_id, None)

    def blocking_s(self, run: p.RunBatch) -> float:
        """Seconds ``run`` should still wait for handed-off KV (0: start it now). Awaits past
        their backstop are given up here: those rows recompute."""
        now = self._clock()
        until = [self._awaited.get(item.request_id) for item in run.items]
        waits = [u - now for u in until if u is not None]
        if waits and max(waits) > 0:
            return min(w for w in waits if w > 0)
        for item in run.items:
            if self._awaited.pop(item.request_id, None) is not None:
                log.warning("gave up waiting for the KV of %s; it is recomputed", item.request_id)
        return 0.0

    def reuse(self, item: p.BatchItem, stats: DispatchStats) -> ParkedKV | None:
        """The request's parked KV, taken out of the store (the caller owns it, blocks
        included), when this worker holds KV covering exactly ``token_ids[:-1]``; any other
        entry of it is stale and freed. Host entries come back as device tensors."""
        entry = self.store.take(item.request_id)
        if entry is None:
            return None
        if entry.token_ids != tuple(item.token_ids[:-1]):
            self.store.free(entry)
            return None
        if entry.tier == "host":
            assert entry.layers is not None
            started_at = self._clock()
            entry.layers = to_device(entry.layers, self.device)
            stats.copy_samples.append((entry.nbytes, self._clock() - started_at))
            stats.restored_tokens += entry.num_tokens
        if entry.peer:
            stats.handoff_tokens += entry.num_tokens
            # what was moved (its blocks here, once landed, are rounded up to whole blocks)
            stats.handoff_bytes += entry.transfer[0] if entry.transfer else entry.nbytes
            if entry.transfer is not None:
                stats.transfer_samples.append(entry.transfer)
        stats.reused_kv_tokens += entry.num_tokens
        return entry
