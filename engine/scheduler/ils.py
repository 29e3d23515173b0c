"""Iteration-level scheduling (ILS, continuous batching): waiting requests join a worker's
running set between decode steps, first come first served, under a memory admission rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from engine.config import ILSAdmission, SchedulerConfig
from engine.scheduler.base import Dispatch, WaitingRequest, WorkerView
from engine.scheduler.prefix_affinity import DEFAULT_PREFIX_BALANCE, PrefixBalance, most_cached

_ARRIVAL = attrgetter("arrived_at", "request_id")


class _Slot:
    """One worker's running set while a round is planned: who runs, who joins now."""

    def __init__(self, view: WorkerView, admission: ILSAdmission, headroom_tokens: int) -> None:
        self.view = view
        self.admission = admission
        self.headroom_tokens = headroom_tokens
        self.memory = view.cost.memory
        # (context_len, remaining steps) per row; on a left-padded cache every row is as wide as
        # the longest (context_len counts the token not yet fed: one column of margin)
        self.rows = [(r.context_len, r.max_new_tokens) for r in view.running]
        self.joining: list[WaitingRequest] = []
        self.peak_bytes = self.peak(self.rows)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def cache_len(self) -> int:
        return max((c for c, _ in self.rows), default=0)

    def load_key(self) -> tuple[int, float, str]:
        return (self.num_rows, self.peak_bytes / self.memory.budget_bytes, self.view.worker_id)

    def peak(self, rows: list[tuple[int, int]]) -> int:
        """Reserve: the honest peak if every row runs its whole remaining budget. Optimistic: the
        cache now plus ``headroom_tokens`` tokens of growth per row. Counted as the worker holds
        KV (whole blocks of a paged cache, or one left-padded cache)."""
        if self.admission == "optimistic":
            rows = [(c, self.headroom_tokens) for c, _ in rows]
        return self.memory.reservations_peak_bytes(rows)

    def peak_with(self, r: WaitingRequest) -> int:
        """Predicted peak if ``r`` joined now."""
        return self.peak([*self.rows, (r.context_len, r.max_new_tokens)])

    def admit(self, r: WaitingRequest, peak_bytes: int) -> None:
        self.rows.append((r.context_len, r.max_new_tokens))
        self.joining.append(r)
        self.peak_bytes = peak_bytes

    def dispatch(self) -> Dispatch:
        max_steps = max(r.max_new_tokens for r in self.joining)
        return Dispatch(
            worker_id=self.view.worker_id,
            request_ids=tuple(r.request_id for r in self.joining),
            max_steps=max_steps,
            join=True,
            padded_len=max(r.context_len for r in self.joining),
            predicted_s=self.view.cost.time.slice_s(
                self.num_rows,
                self.cache_len,
                max_steps,
                prefill_rows=len(self.joining),
                step_lens=[min(m, max_steps) for _, m in self.rows],
            ),
            predicted_peak_bytes=self.peak_bytes,
        )


class ILSPolicy:
    """Continuous batching: FCFS admission into the least loaded worker that can take the
    request; a head request that fits nowhere now blocks the queue (no overtaking, no
    starvation). Each request's step budget is its own max_new_tokens."""

    name = "ils"

    def __init__(
        self,
        admission: ILSAdmission = "reserve",
        max_concurrency: int | None = None,
        max_batch_size: int = 256,
        headroom_tokens: int = 16,
        prefix_balance: PrefixBalance = DEFAULT_PREFIX_BALANCE,
    ) -> None:
        self.admission = admission
        self.max_rows = (
            max_batch_size if max_concurrency is None else min(max_concurrency, max_batch_size)
        )
        self.headroom_tokens = headroom_tokens  # optimistic: growth allowed for before a preempt
        self.prefix_balance = prefix_balance  # how far a prefix hit may load one worker

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> ILSPolicy:
        return cls(cfg.ils_admission, cfg.max_concurrency, cfg.max_batch_size)

    def schedule(
        self, waiting: Sequence[WaitingRequest], workers: Sequence[WorkerView], now: float
    ) -> list[Dispatch]:
        slots = [_Slot(w, self.admission, self.headroom_tokens) for w in workers]
        if not slots:
            return []
        for r in sorted(waiting, key=_ARRIVAL):
            if not self._place(r, slots):
                if self._fits_empty(r, slots):
                    break  # FCFS: wait until some worker has room for the head
                # It fits no worker even alone: the broker should have rejected it; skip it.
        return [s.dispatch() for s in slots if s.joining]

    def _place(self, r: WaitingRequest, slots: list[_Slot]) -> bool:
        """The least loaded worker with room; with a prefix cached somewhere, the one holding
        most of it among those within the balance bound (engine/scheduler/prefix_affinity.py)."""
        fits = []
        for slot in sorted(slots, key=_Slot.load_key):
            if slot.num_rows >= self.max_rows:
                continue
            peak = slot.peak_with(r)
            if peak <= slot.memory.budget_bytes:
                fits.append((slot, peak))
                if not r.cached_tokens:
                    break
        if not fits:
            return False
        slot, peak = most_cached(
            fits,
            lambda f: f[0].num_rows,
            lambda f: r.cached_tokens.get(f[0].view.worker_id, 0),
            self.prefix_balance,
        )
        slot.admit(r, peak)
        return True

    def _fits_empty(self, r: WaitingRequest, slots: list[_Slot]) -> bool:
        return any(
            s.peak([(r.context_len, r.max_new_tokens)]) <= s.memory.budget_bytes for s in slots
        )
