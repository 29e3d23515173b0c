"""Slice-level scheduling (SCLS): batches of length-sorted requests formed by dynamic
programming for one slice of at most S steps, assigned to workers by the max-min rule, each
formed as late as is safe (when its worker is about to go idle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
import numpy.typing as npt

from engine.config import KVMode, SchedulerConfig
from engine.cost_model import MemoryModel
from engine.scheduler.assignment import assign_min_max
from engine.scheduler.base import Dispatch, WaitingRequest, WorkerView
from engine.scheduler.batcher import Rows, Span, fits_all
from engine.scheduler.batcher import partition as dp_partition

IntArray = npt.NDArray[np.int64]


class _Pool:
    """The waiting requests of one round as arrays (index = position in ``requests``)."""

    def __init__(self, waiting: Sequence[WaitingRequest], slice_len: int, aged_before: float):
        n = len(waiting)
        self.requests = waiting
        self.context_lens = np.fromiter(map(attrgetter("context_len"), waiting), np.int64, n)
        max_new = np.fromiter(map(attrgetter("max_new_tokens"), waiting), np.int64, n)
        self.step_lens = np.clip(max_new, 1, slice_len)  # steps each may take in one slice
        self.arrived = np.fromiter(map(attrgetter("arrived_at"), waiting), np.float64, n)
        self.aged = self.arrived <= aged_before
        self.holders = [r.kv_worker_id for r in waiting]
        self.code_of: dict[str, int] = {}  # worker id -> its index in the round's views
        self.holder_codes = np.full(n, -1, dtype=np.int64)  # holder's index, -1: none or gone
        self.taken = np.zeros(n, dtype=bool)

    def oldest(self, indices: IntArray) -> IntArray:
        return indices[np.argsort(self.arrived[indices], kind="stable")]

    def window(self, order: IntArray, fill_tokens: float, min_len: int, max_len: int) -> IntArray:
        """The first untaken indices of ``order`` whose KV tokens (context + slice) add up to
        ``fill_tokens``, at least ``min_len`` and at most ``max_len`` of them."""
        untaken = order[~self.taken[order]][:max_len]
        tokens = np.cumsum(self.context_lens[untaken] + self.step_lens[untaken])
        size = int(np.searchsorted(tokens, fill_tokens, side="left")) + 1
        return untaken[: max(size, min_len)]


@dataclass(frozen=True, slots=True)
class _Candidates:
    """Pool indices of one DP's rows, sorted by context length, and their arrays."""

    indices: IntArray
    rows: Rows


class SCLSPolicy:
    """Slice-level scheduling; see docs/SCHEDULING.md for the algorithm and its costs."""

    name = "scls"

    def __init__(
        self,
        slice_len: int,
        max_batch_size: int,
        aging_s: float,
        kv_mode: KVMode = "keep",
        min_lookahead_s: float = 0.005,
        window_fill: float = 1.5,
        min_window_len: int = 32,
        max_window_len: int = 4096,
        units_per_batch: int = 16,
    ) -> None:
        self.slice_len = slice_len
        self.max_batch_size = max_batch_size
        self.aging_s = aging_s
        self.kv_mode = kv_mode
        self.min_lookahead_s = min_lookahead_s  # dispatch this early before a worker goes idle
        # A DP considers the oldest requests whose KV would fill its workers' budgets this many
        # times over (at least min_window_len, at most max_window_len requests).
        self.window_fill = window_fill
        self.min_window_len = min_window_len
        self.max_window_len = max_window_len
        self.units_per_batch = units_per_batch  # DP cut granularity: ~1/16 of a full batch

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> SCLSPolicy:
        return cls(cfg.slice_len, cfg.max_batch_size, cfg.aging_s, cfg.kv_mode)

    def schedule(
        self, waiting: Sequence[WaitingRequest], workers: Sequence[WorkerView], now: float
    ) -> list[Dispatch]:
        ready = [w for w in workers if self.is_ready(w, now)]
        if not ready or not waiting:
            return []
        ready.sort(key=attrgetter("busy_until", "worker_id"))
        pool = _Pool(waiting, self.slice_len, now - self.aging_s)
        parked, free = self._split(pool, workers, ready)
        plan: list[Dispatch] = []
        free_workers = []
        for worker in ready:
            own = parked.get(worker.worker_id)
            if own is None:
                free_workers.append(worker)
                continue
            indices = np.concatenate(
                [own[: self.max_window_len], self._window(pool, free, [worker], own)]
            )
            dispatch = self._plan_own(pool, worker, indices)
            if dispatch is not None:
                plan.append(dispatch)
        if free_workers:
            plan += self._plan_free(pool, free_workers, free, now)
        return plan

    def is_ready(self, worker: WorkerView, now: float) -> bool:
        """Adaptive batching interval: a worker takes a batch when nothing waits in its queue and
        it is idle or, in recompute mode, within one decode step (or min_lookahead_s) of idle.
        In keep mode it waits until its slice ends, so that the survivors, parked on it, can be
        batched again with their KV."""
        if worker.num_queued_batches > 0:
            return False
        if not worker.running:
            return True
        if self.kv_mode == "keep":
            return False
        context_len = max(r.context_len for r in worker.running)
        step_s = worker.cost.time.decode_step_s(len(worker.running), context_len)
        return worker.busy_until - now <= max(self.min_lookahead_s, step_s)

    def _split(
        self, pool: _Pool, workers: Sequence[WorkerView], ready: Sequence[WorkerView]
    ) -> tuple[dict[str, IntArray], IntArray]:
        """Indices whose KV is parked on a ready worker (per worker) and the rest, oldest first.
        A request parked on a busy worker waits for it unless it has aged."""
        everyone = np.arange(len(pool.holders))
        if not any(pool.holders):
            return {}, pool.oldest(everyone)
        code_of: dict[str | None, int] = {w.worker_id: i for i, w in enumerate(workers)}
        pool.code_of = {w.worker_id: i for i, w in enumerate(workers)}
        codes = np.fromiter((code_of.get(h, -1) for h in pool.holders), np.int64, len(everyone))
        pool.holder_codes = codes
        is_ready = np.zeros(len(workers) + 1, dtype=bool)  # index -1: no holder
        is_ready[[code_of[w.worker_id] for w in ready]] = True
        held_ready = is_ready[codes]
        held_busy = (codes >= 0) & ~held_ready
        parked = {}
        for w in ready:
            own = everyone[codes == code_of[w.worker_id]]
            if len(own):
                parked[w.worker_id] = pool.oldest(own)
        return parked, pool.oldest(everyone[~held_ready & (~held_busy | pool.aged)])

    # -- forming batches ------------------------------------------------------------------

    def _candidates(
        self, pool: _Pool, indices: IntArray, memories: Sequence[MemoryModel], holder: int | None
    ) -> _Candidates | None:
        """Sort by context length; drop requests that fit no target even alone (the broker
        should reject those: see MemoryModel.max_request_tokens)."""
        ctx, steps = pool.context_lens[indices], pool.step_lens[indices]
        indices = indices[fits_all(memories, np.ones_like(ctx), ctx, steps)]
        if len(indices) == 0:
            return None
        indices = indices[np.argsort(pool.context_lens[indices], kind="stable")]
        if holder is None:
            needs_prefill = np.ones(len(indices), dtype=bool)
        else:  # rows parked on the target worker (index ``holder``) reuse their KV
            needs_prefill = pool.holder_codes[indices] != holder
        rows = Rows(pool.context_lens[indices], pool.step_lens[indices], needs_prefill)
        return _Candidates(indices, rows)

    def _partition(
        self, cands: _Candidates, worker: WorkerView, memories: Sequence[MemoryModel]
    ) -> list[Span]:
        return dp_partition(
            cands.rows, worker.cost.time, memories, self.max_batch_size, self.units_per_batch
        )

    def _ranked(self, pool: _Pool, cands: _Candidates, spans: list[Span]) -> list[Span]:
        """Spans holding an aged request first (oldest first), then by predicted throughput."""
        starts = np.asarray([s.start for s in spans], dtype=np.int64)
        aged = np.maximum.reduceat(pool.aged[cands.indices].astype(np.int8), starts)
        oldest = np.minimum.reduceat(pool.arrived[cands.indices], starts)
        keys = [
            (0, float(oldest[i])) if aged[i] else (1, -s.num_tokens / max(s.predicted_s, 1e-12))
            for i, s in enumerate(spans)
        ]
        return [spans[i] for i in sorted(range(len(spans)), key=keys.__getitem__)]

    def _plan_own(self, pool: _Pool, worker: WorkerView, indices: IntArray) -> Dispatch | None:
        """One batch for a worker holding parked KV: its parked requests skip the prefill."""
        memories = [worker.cost.memory]
        cands = self._candidates(pool, indices, memories, pool.code_of[worker.worker_id])
        if cands is None:
            return None
        best = self._ranked(pool, cands, self._partition(cands, worker, memories))[0]
        return self._dispatch(pool, worker, cands, best)

    def _plan_free(
        self, pool: _Pool, workers: list[WorkerView], free: IntArray, now: float
    ) -> list[Dispatch]:
        """Batches for workers without parked KV: one DP (safe for all of their memory models,
        timed by the earliest one's time model), best batches first, max-min assignment."""
        memories = list({id(w.cost.memory): w.cost.memory for w in workers}.values())
        cands = self._candidates(pool, self._window(pool, free, workers), memories, None)
        if cands is None:
            return []
        spans = self._partition(cands, workers[0], memories)
        chosen = self._ranked(pool, cands, spans)[: len(workers)]
        completion = [
            [
                max(w.busy_until, now)
                + w.cost.time.slice_s_sums(
                    s.padded_len, s.steps, s.num_prefill_rows, s.num_tokens, s.token_steps
                )
                for w in workers
            ]
            for s in chosen
        ]
        placement = assign_min_max(completion)
        return [
            self._dispatch(pool, workers[w], cands, s)
            for s, w in zip(chosen, placement, strict=True)
        ]

    def _window(
        self,
        pool: _Pool,
        free: IntArray,
        workers: Sequence[WorkerView],
        own: IntArray | None = None,
    ) -> IntArray:
        """The oldest free requests that, with ``own`` (parked requests), fill the workers'
        budgets ``window_fill`` times over."""
        fill = self.window_fill * sum(w.cost.memory.capacity_tokens for w in workers)
        if own is not None:
            fill -= float(np.sum(pool.context_lens[own] + pool.step_lens[own]))
        return pool.window(free, fill, self.min_window_len, self.max_window_len)

    def _dispatch(
        self, pool: _Pool, worker: WorkerView, cands: _Candidates, span: Span
    ) -> Dispatch:
        members = cands.indices[span.start : span.end].tolist()
        pool.taken[members] = True
        prefill_rows = sum(1 for i in members if pool.holders[i] != worker.worker_id)
        return Dispatch(
            worker_id=worker.worker_id,
            request_ids=tuple(pool.requests[i].request_id for i in members),
            max_steps=span.steps,
            join=False,
            padded_len=span.padded_len,
            predicted_s=float(
                worker.cost.time.slice_s_sums(
                    span.padded_len, span.steps, prefill_rows, span.num_tokens, span.token_steps
                )
            ),
            predicted_peak_bytes=worker.cost.memory.batch_peak_bytes(
                span.num_rows, span.padded_len, span.steps
            ),
        )
