"""Sequence-level scheduling (SLS): first come first served static batches, each sized for the
worst case and run on an idle worker until its longest request ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from engine.config import SchedulerConfig
from engine.scheduler.base import Dispatch, WaitingRequest, WorkerView

_ARRIVAL = attrgetter("arrived_at", "request_id")


class SLSPolicy:
    """Static batching: an idle worker (nothing running or queued) takes the longest FCFS prefix
    of the queue that fits its budget even if every row generated ``max_gen_len`` tokens
    (n * (padded_len + max_gen_len) tokens), capped by ``max_batch_size``."""

    name = "sls"

    def __init__(self, max_gen_len: int, max_batch_size: int) -> None:
        self.max_gen_len = max_gen_len
        self.max_batch_size = max_batch_size

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> SLSPolicy:
        return cls(cfg.max_gen_len, cfg.max_batch_size)

    def schedule(
        self, waiting: Sequence[WaitingRequest], workers: Sequence[WorkerView], now: float
    ) -> list[Dispatch]:
        idle = [w for w in workers if not w.running and w.num_queued_batches == 0]
        if not idle or not waiting:
            return []
        # Requests that fit no worker even alone can never run; the broker should reject them.
        longest = max(self._longest_alone(w) for w in workers)
        queue = sorted((r for r in waiting if r.context_len <= longest), key=_ARRIVAL)
        plan = []
        pos = 0
        for worker in sorted(idle, key=attrgetter("busy_until", "worker_id")):
            count, padded_len = self._prefix(worker, queue, pos)
            if count == 0:
                continue  # the head needs a larger worker: FCFS, nobody overtakes it
            members = queue[pos : pos + count]
            pos += count
            plan.append(self._dispatch(worker, members, padded_len))
        return plan

    def _longest_alone(self, worker: WorkerView) -> int:
        """The longest context that fits this worker alone for max_gen_len steps."""
        mem = worker.cost.memory
        return mem.capacity_tokens - self.max_gen_len - mem.slack_tokens

    def _fits(self, worker: WorkerView, n: int, padded_len: int) -> bool:
        return worker.cost.memory.fits(n, padded_len, self.max_gen_len)

    def _prefix(self, worker: WorkerView, queue: list[WaitingRequest], pos: int) -> tuple[int, int]:
        """How many requests from ``pos`` form the batch, and their padded length."""
        count, padded_len = 0, 0
        for r in queue[pos : pos + self.max_batch_size]:
            longer = max(padded_len, r.context_len)
            if not self._fits(worker, count + 1, longer):
                break
            count, padded_len = count + 1, longer
        return count, padded_len

    def _dispatch(
        self, worker: WorkerView, members: list[WaitingRequest], padded_len: int
    ) -> Dispatch:
        n = len(members)
        step_lens = [min(r.max_new_tokens, self.max_gen_len) for r in members]
        return Dispatch(
            worker_id=worker.worker_id,
            request_ids=tuple(r.request_id for r in members),
            max_steps=self.max_gen_len,
            join=False,
            padded_len=padded_len,
            predicted_s=worker.cost.time.slice_s(
                n, padded_len, max(step_lens), step_lens=step_lens
            ),
            predicted_peak_bytes=worker.cost.memory.batch_peak_bytes(
                n, padded_len, self.max_gen_len
            ),
        )
