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
    progress: int = 0
    progress_at: float = 0.0  # when progress last moved, or its first batch was dispatched
    session: int = 0  # from its Ready: RunBatch carries it, Reset names it
    draining: bool = False  # it sent Draining: nothing more is dispatched to it
    heartbeat: p.Heartbeat | None = None
    generated_tokens: int = 0
    prefix_query_tokens: int = 0  # prefix cache lookups and hits, in tokens (from BatchDone)
    prefix_hit_tokens: int = 0
    busy_s: float = 0.0
    refit_at: float = -float("inf")  # when its time model was last refitted (BrokerCore)
    token_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    # The policy's view of the requests in its batches (BrokerCore._running_view), kept between
    # rounds; None (stale) whenever a batch, a batch's requests or a request's tokens or slice
    # change. Rebuilding it for every worker every round was most of a large simulation's time.
    running_view: tuple | None = None

    @property
    def kv_budget_bytes(self) -> int:
        return self.ready.kv_budget_bytes

    def started_batches(self) -> list[BatchState]:
        return [b for b in self.batches.values() if b.step > 0 or b.dispatch.join]

    def queued_batches(self) -> list[BatchState]:
        return [b for b in self.batches.values() if b.step == 0 and not b.dispatch.join]

    def add_batch(self, batch: BatchState, now: float) -> None:
        if not self.batches:  # idle until now: the hang clock starts with this batch
            self.progress_at = now
        self.batches[batch.batch_id] = batch
        self.running_view = None
        if batch.dispatch.join:
            self.busy_until = max(self.busy_until, now + batch.dispatch.predicted_s)
        else:
            self.busy_until = max(self.busy_until, now) + batch.dispatch.predicted_s

    def finish_batch(self, batch_id: int, measured_s: float, now: float) -> BatchState | None:
        batch = self.batches.pop(batch_id, None)
        self.running_view = None
        self.busy_s += measured_s
        # The rest of the queue is still predicted; what ran is now known.
        remaining = sum(b.dispatch.predicted_s for b in self.batches.values())
        self.busy_until = now + remaining
        return batch

    def lost_reason(self, now: float, timeout_s: float, hang_factor: float) -> str | None:
        """Why this worker must be declared lost now, or None. Silent: no frame for
        ``timeout_s``. Hung: batches dispatched, yet its decode progress counter stood still for
        ``timeout_s`` plus ``hang_factor`` times the predicted seconds of its longest batch (so
        a long legitimate prefill, which the cost model predicts, is not taken for a hang)."""
        if now - self.last_seen_at > timeout_s:
            return f"silent for {now - self.last_seen_at:.1f} s"
        if not self.batches:
            return None
        longest_s = max(b.dispatch.predicted_s for b in self.batches.values())
        allowed_s = timeout_s + hang_factor * longest_s
        if now - self.progress_at > allowed_s:
            return (
                f"hung: no decode progress for {now - self.progress_at:.1f} s with "
                f"{len(self.batches)} batch(es) dispatched (allowed {allowed_s:.1f} s)"
            )
        return None

    def tokens_per_s(self, now: float, window_s: float = 5.0) -> float:
        while self.token_times and self.token_times[0][0] < now - window_s:
            self.token_times.popleft()
        return sum(n for _, n in self.token_times) / window_s
