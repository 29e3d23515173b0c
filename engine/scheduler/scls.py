"""Strict slice-level scheduling (``scls:strict``, as in the paper): batches of length-sorted requests formed by dynamic
programming for one slice of at most S steps, assigned to workers by the max-min rule, each
formed as late as is safe (when its worker is about to go idle). Between slices a request's KV
is recomputed, kept on its worker, or (auto) brought wherever the cost model says is cheapest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
import numpy.typing as npt

from engine.config import KVMode, SchedulerConfig
from engine.cost_model import MemoryModel
from engine.scheduler.assignment import assign_min_max
from engine.scheduler.base import Dispatch, WaitingRequest, WorkerView
from engine.scheduler.batcher import Rows, Span, fits_all, split_to_fill
from engine.scheduler.batcher import partition as dp_partition

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


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
        self.on_host = np.fromiter(map(attrgetter("kv_on_host"), waiting), bool, n)
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


@dataclass(frozen=True, slots=True)
class _Costed:
    """One batch on one worker (auto mode): each row's cheapest way to its KV, priced."""

    completion: float  # predicted monotonic end
    predicted_s: float  # the slice plus restores and handoffs
    handoff_ids: tuple[str, ...]


class SCLSPolicy:
    """Paper-faithful slice-level scheduling: a batch per slice, no admission until it ends
    (``--policy scls:strict``); see docs/SCHEDULING.md for the algorithm and its costs."""

    name = "scls:strict"

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
        if self.kv_mode == "auto":
            return self._plan_auto(pool, workers, ready, now)
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
        In keep and auto modes it waits until its slice ends, so that the survivors, parked on
        it, can be batched again with their KV."""
        if worker.num_queued_batches > 0:
            return False
        if not worker.running:
            return True
        if self.kv_mode != "recompute":
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
        code_of = self._set_holders(pool, workers)
        codes = pool.holder_codes
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

    @staticmethod
    def _set_holders(pool: _Pool, workers: Sequence[WorkerView]) -> dict[str, int]:
        """Each request's holder as an index into ``workers`` (-1: none, or a worker gone)."""
        pool.code_of = {w.worker_id: i for i, w in enumerate(workers)}
        get = pool.code_of.get
        pool.holder_codes = np.fromiter(
            (-1 if h is None else get(h, -1) for h in pool.holders), np.int64, len(pool.holders)
        )
        return pool.code_of

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
        chosen = split_to_fill(cands.rows, chosen, len(workers), workers[0].cost.time)
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
        self,
        pool: _Pool,
        worker: WorkerView,
        cands: _Candidates,
        span: Span,
        costed: _Costed | None = None,
    ) -> Dispatch:
        members = cands.indices[span.start : span.end].tolist()
        pool.taken[members] = True
        if costed is None:
            prefill_rows = sum(1 for i in members if pool.holders[i] != worker.worker_id)
            predicted_s = worker.cost.time.slice_s_sums(
                span.padded_len, span.steps, prefill_rows, span.num_tokens, span.token_steps
            )
        else:
            predicted_s = costed.predicted_s
        return Dispatch(
            worker_id=worker.worker_id,
            request_ids=tuple(pool.requests[i].request_id for i in members),
            max_steps=span.steps,
            join=False,
            padded_len=span.padded_len,
            predicted_s=float(predicted_s),
            predicted_peak_bytes=worker.cost.memory.batch_peak_bytes(
                span.num_rows, span.padded_len, span.steps
            ),
            handoff_ids=() if costed is None else costed.handoff_ids,
        )

    # -- auto: KV handoffs, and work that migrates ------------------------------------------

    def _plan_auto(
        self, pool: _Pool, workers: Sequence[WorkerView], ready: list[WorkerView], now: float
    ) -> list[Dispatch]:
        """All ready workers share one DP over the requests they hold plus the oldest others;
        each batch then goes where it completes soonest, counting, per row, the cheapest of
        its kept KV, a restore, a handoff from its holder, or a recompute. Busy workers are
        places too: a batch that would end sooner there waits for them, so that a slow ready
        worker takes its share, not everything (see _place)."""
        self._set_holders(pool, workers)
        everyone = np.arange(len(pool.holders))
        ready_codes = np.asarray([pool.code_of[w.worker_id] for w in ready], dtype=np.int64)
        held = np.isin(pool.holder_codes, ready_codes)
        own = pool.oldest(everyone[held])[: self.max_window_len]
        rest = pool.oldest(everyone[~held])
        indices = np.concatenate([own, self._window(pool, rest, ready, own)])
        memories = list({id(w.cost.memory): w.cost.memory for w in ready}.values())
        cands = self._candidates(pool, indices, memories, None)
        if cands is None:
            return []
        cands = self._with_move_costs(pool, cands, ready, ready_codes)
        ranked = self._ranked(pool, cands, self._partition(cands, ready[0], memories))
        ready_ids = {w.worker_id for w in ready}
        busy = [w for w in workers if w.worker_id not in ready_ids]
        best = self._place(pool, cands, ranked, ready, [], now)
        if busy:  # a part may wait for a busy worker that would end it sooner
            shared = self._place(pool, cands, ranked, ready, busy, now)
            if shared is not None and best is not None and shared[0] < best[0]:
                best = shared
        return [] if best is None else [self._dispatch(pool, *p) for p in best[1]]

    def _place(
        self,
        pool: _Pool,
        cands: _Candidates,
        ranked: list[Span],
        ready: list[WorkerView],
        busy: list[WorkerView],
        now: float,
    ) -> tuple[float, list[tuple[WorkerView, _Candidates, Span, _Costed]]] | None:
        """The best batches for the ready workers, halved until there is one per worker
        (ready and busy ones), placed by the min-max rule on completion: the latest completion,
        and what to dispatch now (the batches placed on ready workers; the others wait in the
        pool). The batch holding the oldest request never waits (its busy places count as
        never); None when it would have to, or when no ready worker gets anything."""
        targets = ready + busy
        time = ready[0].cost.time
        chosen = split_to_fill(cands.rows, ranked[: len(ready)], len(targets), time)
        oldest = int(np.argmin(pool.arrived[cands.indices]))
        first = next((b for b, s in enumerate(chosen) if s.start <= oldest < s.end), None)
        costed = [[self._costed(pool, cands, s, w, now) for w in targets] for s in chosen]
        completion = [
            [c.completion if w < len(ready) or b != first else math.inf for w, c in enumerate(row)]
            for b, row in enumerate(costed)
        ]
        placement = assign_min_max(completion)
        if first is not None and placement[first] >= len(ready):
            return None
        now_placed = [
            (ready[w], cands, s, costed[b][w])
            for b, (s, w) in enumerate(zip(chosen, placement, strict=True))
            if w < len(ready)
        ]
        latest = max(completion[b][w] for b, w in enumerate(placement))
        return (latest, now_placed) if now_placed else None

    def _row_costs(
        self, pool: _Pool, members: IntArray, worker: WorkerView, target: IntArray
    ) -> tuple[npt.NDArray[np.bool_], FloatArray, npt.NDArray[np.bool_]]:
        """Per row, for targets ``target`` (worker indices, with ``worker``'s models): whether
        its KV is used (kept, restored or handed off: cheaper than recomputing), the seconds
        that costs, and whether it is a handoff."""
        cost = worker.cost
        holders = pool.holder_codes[members]
        nbytes = (pool.context_lens[members] - 1) * cost.memory.kv_bytes_per_token
        mine = holders == target
        move_s = np.where(
            mine,
            np.where(pool.on_host[members], cost.kv.restore_s(nbytes), 0.0),
            cost.kv.handoff_s(nbytes),
        )
        use_kv = (holders >= 0) & (move_s <= cost.time.row_prefill_s(pool.context_lens[members]))
        return use_kv, np.where(use_kv, move_s, 0.0), use_kv & ~mine

    def _with_move_costs(
        self, pool: _Pool, cands: _Candidates, ready: list[WorkerView], ready_codes: IntArray
    ) -> _Candidates:
        """The DP's view: a row held by a ready worker is priced there, any other on the
        earliest ready worker (the assignment prices every row exactly per worker later)."""
        holders = pool.holder_codes[cands.indices]
        target = np.where(np.isin(holders, ready_codes), holders, ready_codes[0])
        use_kv, move_s, _ = self._row_costs(pool, cands.indices, ready[0], target)
        rows = Rows(cands.rows.context_lens, cands.rows.step_lens, ~use_kv, move_s)
        return _Candidates(cands.indices, rows)

    def _costed(
        self, pool: _Pool, cands: _Candidates, span: Span, worker: WorkerView, now: float
    ) -> _Costed:
        members = cands.indices[span.start : span.end]
        code = np.full(len(members), pool.code_of[worker.worker_id], dtype=np.int64)
        use_kv, move_s, handoff = self._row_costs(pool, members, worker, code)
        slice_s = worker.cost.time.slice_s_sums(
            span.padded_len, span.steps, int((~use_kv).sum()), span.num_tokens, span.token_steps
        )
        predicted_s = float(slice_s) + float(move_s.sum())
        ids = tuple(pool.requests[i].request_id for i in members[handoff].tolist())
        completion = max(worker.busy_until, now) + predicted_s
        if not worker.cost.memory.fits(span.num_rows, span.padded_len, span.steps):
            completion = math.inf  # a busy worker with a smaller budget
        return _Costed(completion, predicted_s, ids)
