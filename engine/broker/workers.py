"""What the broker knows about each worker: its announcement, cost model, dispatched batches and
predicted busy time."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from engine import protocol as p
from engine.cost_model import CostModel
from engine.scheduler.base import Dispatch


@dataclass(slots=True, eq=False)
class BatchState:
    batch_id: int
    worker_id: str
    dispatch: Dispatch
    request_ids: set[str]  # those still in the batch (not yet released)
    dispatched_at: float
    num_requests: int
    step: int = 0  # most tokens any row of it has produced
    num_finished: int = 0

    def info(self) -> p.BatchInfo:
        d = self.dispatch
        return p.BatchInfo(
            batch_id=self.batch_id,
            num_requests=self.num_requests,
            padded_len=d.padded_len,
            max_steps=d.max_steps,
            predicted_s=d.predicted_s,
            predicted_peak_bytes=d.predicted_peak_bytes,
            step=self.step,
            num_finished=self.num_finished,
        )


@dataclass(slots=True, eq=False)
class WorkerState:
    worker_id: str
    identity: bytes  # ZeroMQ routing id of its connection
    ready: p.Ready
    cost: CostModel
    joined_at: float
    last_seen_at: float
    batches: dict[int, BatchState] = field(default_factory=dict)  # dispatch order
    busy_until: float = 0.0
    parked: dict[str, int] = field(default_factory=dict)  # request id -> parked KV bytes
    progress: int = 0
    heartbeat: p.Heartbeat | None = None
    generated_tokens: int = 0
    busy_s: float = 0.0
    token_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))

    @property
    def kv_budget_bytes(self) -> int:
        return self.ready.kv_budget_bytes

    def started_batches(self) -> list[BatchState]:
        return [b for b in self.batches.values() if b.step > 0 or b.dispatch.join]

    def queued_batches(self) -> list[BatchState]:
        return [b for b in self.batches.values() if b.step == 0 and not b.dispatch.join]

    def add_batch(self, batch: BatchState, now: float) -> None:
        self.batches[batch.batch_id] = batch
        if batch.dispatch.join:
            self.busy_until = max(self.busy_until, now + batch.dispatch.predicted_s)
        else:
            self.busy_until = max(self.busy_until, now) + batch.dispatch.predicted_s

    def finish_batch(self, batch_id: int, measured_s: float, now: float) -> BatchState | None:
        batch = self.batches.pop(batch_id, None)
        self.busy_s += measured_s
        # The rest of the queue is still predicted; what ran is now known.
        remaining = sum(b.dispatch.predicted_s for b in self.batches.values())
        self.busy_until = now + remaining
        return batch

    def tokens_per_s(self, now: float, window_s: float = 5.0) -> float:
        while self.token_times and self.token_times[0][0] < now - window_s:
            self.token_times.popleft()
        return sum(n for _, n in self.token_times) / window_s
