"""Continuous slice-level scheduling, the default SCLS: a request holds a reservation for one
slice (the KV of its context plus S tokens, at most S steps) and joins a worker's running set at
any decode step when that reservation fits beside the ones already held. One boundary ahead (a
few steps before its slice ends) the policy renews the reservation where the request runs, so it
runs on without a stop, when it still fits there and no other worker would end its next slice
sooner; otherwise the request comes back to the pool at its boundary and is placed again, moved
(its KV restored, handed off or recomputed) to where its next slice ends soonest. Reservations
never exceed a worker's budget, so nobody is preempted for memory (zero OOM by construction).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

from engine.config import KVMode, SchedulerConfig
from engine.cost_model import MemoryModel
from engine.scheduler.base import Dispatch, RunningRequest, WaitingRequest, WorkerView
from engine.scheduler.prefix_affinity import DEFAULT_PREFIX_BALANCE, PrefixBalance, balanced

_BY_ARRIVAL = attrgetter("arrived_at", "request_id")


def _arrival(r: WaitingRequest | tuple[str, RunningRequest]) -> tuple[float, str]:
    return _BY_ARRIVAL(r[1] if isinstance(r, tuple) else r)


@dataclass(frozen=True, slots=True)
class _Grant:
    """A reservation granted this round: the request, its slice's steps, how it gets its KV."""

    request: WaitingRequest
    steps: int
    move_s: float  # seconds to bring its KV here (0: kept here; a recompute is its prefill row)
    prefill: bool  # recomputed here
    handoff: bool  # pulled from the worker that holds it


@dataclass(frozen=True, slots=True)
class _Held:
    """What a worker's running set holds, as planning starts from it: a pure function of the
    view's ``running`` tuple and memory model, so it is kept while they stay the same objects
    (the broker keeps a worker's running tuple until one of its rows changes)."""

    running: tuple[RunningRequest, ...]
    memory: MemoryModel
    rows: tuple[tuple[int, int], ...]  # (context_len, steps left in its slice) per reservation
    peak_bytes: int
    sum_context: int
    max_context: int

    @classmethod
    def of(cls, view: WorkerView) -> _Held:
        memory = view.cost.memory
        rows = tuple([(r.context_len, r.steps_left) for r in view.running])
        return cls(
            view.running,
            memory,
            rows,
            memory.reservations_peak_bytes(rows),
            sum([c for c, _ in rows]),
            max([c for c, _ in rows], default=0),
        )

    def holds(self, view: WorkerView) -> bool:
        return self.running is view.running and self.memory is view.cost.memory


class _Slot:
    """One worker while a round is planned: the reservations it holds and those granted now."""

    def __init__(self, view: WorkerView, held: _Held) -> None:
        self.view = view
        self.memory = held.memory
        self.time = view.cost.time
        # (context_len, steps left in its slice) per reservation held or granted
        self.rows = list(held.rows)
        self._index: dict[str, int] | None = None  # request id -> row (renewals only)
        self.peak_bytes = held.peak_bytes
        self.sum_context = held.sum_context
        self.max_context = held.max_context
        self.grants: list[_Grant] = []
        self.renewed: dict[str, int] = {}  # request id -> steps its slice grew by

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {r.request_id: i for i, r in enumerate(self.view.running)}
        return self._index

    @property
    def worker_id(self) -> str:
        return self.view.worker_id

    def peak_with(self, context_len: int, steps: int) -> int:
        """The honest peak if one more reservation joined."""
        if self.memory.block_tokens:  # rows own their blocks: reservations add up
            return self.peak_bytes + self.memory.reservation_bytes(context_len, steps)
        return self.memory.reservations_peak_bytes([*self.rows, (context_len, steps)])

    def fitting_steps(self, context_len: int, want: int, least: int, request_id: str = "") -> int:
        """The most steps in [least, want] for which a new reservation (or, given
        ``request_id``, a running one grown by that many) fits the budget; 0 if none does."""
        budget = self.memory.budget_bytes
        if self._peak(context_len, want, request_id) <= budget:
            return want
        if least >= want or self._peak(context_len, least, request_id) > budget:
            return 0
        lo, hi = least, want  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._peak(context_len, mid, request_id) <= budget else (lo, mid)
        return lo

    def _peak(self, context_len: int, steps: int, request_id: str) -> int:
        """``renewal_peak`` of a running request (``request_id``), else ``peak_with``."""
        if request_id:
            return self.renewal_peak(request_id, steps)
        return self.peak_with(context_len, steps)

    def renewal_peak(self, request_id: str, extra: int) -> int:
        """The honest peak if a running request's reservation grew by ``extra`` steps."""
        i = self.index[request_id]
        context_len, left = self.rows[i]
        if self.memory.block_tokens:
            grown = self.memory.reservation_bytes(context_len, left + extra)
            return self.peak_bytes - self.memory.reservation_bytes(context_len, left) + grown
        rows = list(self.rows)
        rows[i] = (context_len, left + extra)
        return self.memory.reservations_peak_bytes(rows)

    def renew(self, request_id: str, extra: int, peak_bytes: int) -> None:
        i = self.index[request_id]
        self.rows[i] = (self.rows[i][0], self.rows[i][1] + extra)
        self.peak_bytes = peak_bytes
        self.renewed[request_id] = extra

    def step_s(self, context_len: int) -> float:
        """Predicted decode step of the running set with one more row of ``context_len``."""
        n = len(self.rows) + 1
        if self.memory.block_tokens:  # attention reads each row's own context
            width = (self.sum_context + context_len) / n
        else:  # every row is as wide as the longest
            width = max(self.max_context, context_len)
        return self.time.decode_step_s(n, int(width))

    def grant(self, grant: _Grant, peak_bytes: int) -> None:
        context_len = grant.request.context_len
        self.rows.append((context_len, grant.steps))
        self.peak_bytes = peak_bytes
        self.sum_context += context_len
        self.max_context = max(self.max_context, context_len)
        self.grants.append(grant)

    def renewals(self) -> list[Dispatch]:
        """One renewal dispatch per distinct growth (the broker grows each request by
        ``max_steps``, capped by what it may still generate: the policy's own figure)."""
        if not self.renewed:
            return []
        by_extra: dict[int, list[str]] = {}
        for request_id, extra in self.renewed.items():
            by_extra.setdefault(extra, []).append(request_id)
        step_s = self.time.decode_step_s(len(self.rows), self.max_context)
        return [
            Dispatch(
                worker_id=self.worker_id,
                request_ids=tuple(ids),
                max_steps=extra,
                join=True,
                padded_len=self.max_context,
                predicted_s=extra * step_s,
                predicted_peak_bytes=self.peak_bytes,
                renew=True,
            )
            for extra, ids in sorted(by_extra.items(), reverse=True)
        ]

    def dispatches(self, slice_len: int) -> list[Dispatch]:
        """The grants as join dispatches: the full slices in one (each request's budget is
        ``min(max_steps, max_new_tokens)``), each shortened slice length in one of its own."""
        if not self.grants:
            return []
        groups: dict[int, list[_Grant]] = {}
        for g in self.grants:
            full = g.steps == min(slice_len, g.request.max_new_tokens)
            groups.setdefault(0 if full else g.steps, []).append(g)
        return [self._dispatch(grants) for _, grants in sorted(groups.items())]

    def _dispatch(self, grants: list[_Grant]) -> Dispatch:
        max_steps = max(g.steps for g in grants)
        slice_s = self.time.slice_s(
            len(self.rows),
            self.max_context,
            max_steps,
            prefill_rows=sum(g.prefill for g in grants),
            step_lens=[min(m, max_steps) for _, m in self.rows],
        )
        return Dispatch(
            worker_id=self.worker_id,
            request_ids=tuple(g.request.request_id for g in grants),
            max_steps=max_steps,
            join=True,
            padded_len=max(g.request.context_len for g in grants),
            predicted_s=slice_s + sum(g.move_s for g in grants),
            predicted_peak_bytes=self.peak_bytes,
            handoff_ids=tuple(g.request.request_id for g in grants if g.handoff),
        )


class ContinuousSCLSPolicy:
    """Oldest first, each request's next slice goes to the worker where it fits and would end
    soonest (its KV move plus S steps at that worker's predicted step time with it joined). A
    request that fits nowhere now is overtaken by younger ones until it has aged; an aged one
    that fits nowhere stops the round (no starvation). See docs/SCHEDULING.md."""

    name = "scls"

    def __init__(
        self,
        slice_len: int,
        max_batch_size: int,
        aging_s: float,
        kv_mode: KVMode = "auto",
        max_misses: int = 64,
        renew_within_steps: int = 2,
        renew_lookahead_s: float = 0.02,
        min_slice_fraction: float = 0.25,
        tie_tolerance: float = 0.05,
        prefix_balance: PrefixBalance = DEFAULT_PREFIX_BALANCE,
    ) -> None:
        self.slice_len = slice_len
        self.max_batch_size = max_batch_size
        self.aging_s = aging_s
        self.kv_mode = kv_mode
        # A running request is renewed when this few steps, or this many predicted seconds, are
        # left in its slice: early enough that the renewal reaches the worker before it ends.
        self.renew_within_steps = renew_within_steps
        self.renew_lookahead_s = renew_lookahead_s
        # When a whole slice does not fit, a shorter one of at least this many steps does
        # (elastic slices): a request runs on, or starts, instead of waiting at a boundary.
        self.min_steps = max(1, round(slice_len * min_slice_fraction))
        self.tie_tolerance = tie_tolerance  # relative: placements this close count as tied
        self.prefix_balance = prefix_balance  # how far a prefix hit may load one worker
        # A round stops after this many requests in a row found no room (bounds planning time
        # with thousands waiting; the rest are looked at again next round).
        self.max_misses = max_misses
        # Per worker, kept between rounds while its running tuple stays the same object (the
        # broker rebuilds it only when a row changed): what its running set holds, and which
        # of its rows are near their slice's end.
        self._held: dict[str, _Held] = {}
        self._ends: dict[str, tuple[tuple, list[tuple[str, RunningRequest]]]] = {}

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> ContinuousSCLSPolicy:
        return cls(cfg.slice_len, cfg.max_batch_size, cfg.aging_s, cfg.kv_mode)

    def schedule(
        self, waiting: Sequence[WaitingRequest], workers: Sequence[WorkerView], now: float
    ) -> list[Dispatch]:
        ending = self._ending(workers)
        if not workers or not (waiting or ending):
            return []
        slots = {w.worker_id: _Slot(w, self._held_by(w)) for w in workers}
        aged_before = now - self.aging_s
        misses = 0
        ordered = heapq.merge(
            sorted(waiting, key=_BY_ARRIVAL), sorted(ending, key=_arrival), key=_arrival
        )
        for r in ordered:
            if isinstance(r, tuple):  # (worker id, running request): renew it, or let it end
                self._renew(r[1], slots[r[0]], slots)
                continue
            steps = min(self.slice_len, r.max_new_tokens)
            if self._place(r, steps, slots, aged=r.arrived_at <= aged_before):
                misses = 0
                continue
            if r.arrived_at <= aged_before and self._fits_alone(r, steps, slots):
                break  # the oldest waits for room; nobody overtakes it, nobody renews past it
            misses += 1
            if misses > self.max_misses or all(self._full(s) for s in slots.values()):
                break
        plan = [d for s in slots.values() for d in s.renewals()]
        return plan + [d for s in slots.values() for d in s.dispatches(self.slice_len)]

    def _held_by(self, view: WorkerView) -> _Held:
        held = self._held.get(view.worker_id)
        if held is None or not held.holds(view):
            held = self._held[view.worker_id] = _Held.of(view)
        return held

    def _ending(self, workers: Sequence[WorkerView]) -> list[tuple[str, RunningRequest]]:
        """Running requests whose slice ends within ``renew_within_steps`` and that will not be
        done by then, as (worker id, request)."""
        out = []
        for w in workers:
            if not w.running:
                continue
            time = w.cost.time
            key = (w.running, time, tuple(time.decode), w.stream_interval)
            cached = self._ends.get(w.worker_id)
            if cached is not None and cached[0][0] is key[0] and cached[0][1:] == key[1:]:
                out += cached[1]
                continue
            context_len = max(r.context_len for r in w.running)
            step_s = max(time.decode_step_s(len(w.running), context_len), 1e-6)
            within = max(self.renew_within_steps, int(self.renew_lookahead_s / step_s))
            within = min(within, max(1, self.slice_len // 2))  # a slice is renewed once
            # the worker reports its tokens every stream_interval steps: a row may be that less
            # one steps further than the view says
            within = min(within + w.stream_interval - 1, max(1, self.slice_len - 1))
            ends = [
                (w.worker_id, r)
                for r in w.running
                if 0 < r.slice_steps_left <= within and r.max_new_tokens > r.slice_steps_left
            ]
            self._ends[w.worker_id] = (key, ends)
            out += ends
        return out

    def _renew(self, r: RunningRequest, slot: _Slot, slots: dict[str, _Slot]) -> None:
        """Renew where it runs when the longer reservation fits there and no other worker would
        end its next slice sooner (counting the move); else it comes back at its boundary."""
        want = min(self.slice_len, r.max_new_tokens - r.slice_steps_left)
        extra = slot.fitting_steps(r.context_len, want, min(want, self.min_steps), r.request_id)
        if extra == 0:
            return
        peak = slot.renewal_peak(r.request_id, extra)
        here_s = extra * slot.time.decode_step_s(len(slot.rows), slot.max_context)
        if self.kv_mode == "auto":
            nbytes = r.context_len * slot.memory.kv_bytes_per_token
            for other in slots.values():
                if other is slot or len(other.rows) >= self.max_batch_size:
                    continue
                if other.peak_with(r.context_len, extra) > other.memory.budget_bytes:
                    continue
                there_s = other.view.cost.kv.handoff_s(nbytes) + extra * other.step_s(r.context_len)
                if there_s < here_s:
                    return
        slot.renew(r.request_id, extra, peak)

    def _place(self, r: WaitingRequest, steps: int, slots: dict[str, _Slot], aged: bool) -> bool:
        """Grant ``r`` a slice on the worker where it would end soonest. Workers within
        ``tie_tolerance`` of the soonest count as tied (their fitted models differ by noise):
        the one holding more of its prefix, then the one with fewer rows, then the one whose
        dispatched work ends first, takes it, so that idle workers share a light load instead
        of the nominally fastest taking all (a prefix may draw it within the balance bound)."""
        options: list[tuple[float, _Slot, tuple[float, bool, bool], int]] = []
        context_len, least, holder = r.context_len, min(steps, self.min_steps), r.kv_worker_id
        hits: dict[str, int] | None = None  # r.cached_tokens, read once and only if needed
        for slot in slots.values():  # a round's hot loop: every waiting request, every worker
            if len(slot.rows) >= self.max_batch_size:
                continue
            if holder is not None and self._waits_for_holder(r, slot, slots, aged):
                continue
            granted = slot.fitting_steps(context_len, steps, least)
            if granted == 0:
                continue
            if hits is None:  # the broker computes it when first read: only for a candidate
                hits = dict(r.cached_tokens)
            move = self._move(r, slot, slots, hits)
            # a full slice's worth of steps: a shorter one is renewed as room comes back
            end_s = move[0] + steps * slot.step_s(context_len)
            options.append((end_s, slot, move, granted))
        if not options:
            return False
        if hits:  # a prefix hit must not pile everything onto one worker
            options = balanced(options, lambda o: len(o[1].rows), self.prefix_balance)
        soonest = min(o[0] for o in options) * (1 + self.tie_tolerance)
        cached = hits or {}
        _, slot, (move_s, prefill, handoff), granted = min(
            (o for o in options if o[0] <= soonest),
            # among ties, the worker holding more of its prefix (its later turns then find
            # their history in one place), then fewer rows, then the one free first
            key=lambda o: (
                -cached.get(o[1].worker_id, 0),
                len(o[1].rows),
                o[1].view.busy_until,
                o[0],
            ),
        )
        slot.grant(
            _Grant(r, granted, move_s, prefill, handoff), slot.peak_with(r.context_len, granted)
        )
        return True

    def _waits_for_holder(
        self, r: WaitingRequest, slot: _Slot, slots: dict[str, _Slot], aged: bool
    ) -> bool:
        """Keep mode moves no KV between workers: a request whose KV is parked on a live worker
        goes back there, unless it has aged (then it may recompute anywhere)."""
        holder = r.kv_worker_id
        return (
            self.kv_mode == "keep"
            and not aged
            and holder is not None
            and holder in slots
            and holder != slot.worker_id
        )

    def _move(
        self, r: WaitingRequest, slot: _Slot, slots: dict[str, _Slot], hits: dict[str, int]
    ) -> tuple[float, bool, bool]:
        """The cheapest way to have ``r``'s KV on ``slot``'s worker: kept, restored from its host
        tier, handed off from its holder (auto mode), or recomputed (a prefill row), as
        (seconds, recomputed, handed off)."""
        cost = slot.view.cost
        uncached = r.context_len - hits.get(slot.worker_id, 0) if hits else r.context_len
        recompute = (float(cost.time.row_prefill_s(uncached)), True, False)
        holder = r.kv_worker_id
        if self.kv_mode == "recompute" or holder is None or holder not in slots:
            return recompute
        nbytes = (r.context_len - 1) * cost.memory.kv_bytes_per_token
        if holder == slot.worker_id:
            move = (cost.kv.restore_s(nbytes) if r.kv_on_host else 0.0, False, False)
        elif self.kv_mode == "auto":
            move = (cost.kv.handoff_s(nbytes), False, True)
        else:
            return recompute
        return recompute if move[0] > recompute[0] else move

    def _fits_alone(self, r: WaitingRequest, steps: int, slots: dict[str, _Slot]) -> bool:
        least = min(steps, self.min_steps)
        return any(
            s.memory.reservation_bytes(r.context_len, least) <= s.memory.budget_bytes
            for s in slots.values()
        )

    def _full(self, slot: _Slot) -> bool:
        """No request of any length could join: no row left, or not one more token of room."""
        if len(slot.rows) >= self.max_batch_size:
            return True
        return slot.peak_with(1, 1) > slot.memory.budget_bytes
