"""A small discrete-event driver for policy tests: applies each plan, advances time to the next
event, finishes requests at their true lengths and returns the others to the pool, and checks
the plan contract and the real KV use on the way. Not the project's simulator: just enough to
show that every request finishes under each policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.cost_model import CostModel
from engine.scheduler.base import Dispatch, Policy, RunningRequest, WaitingRequest, WorkerView

from .contract import check_plan


@dataclass
class SimRequest:
    request_id: str
    prompt_len: int
    max_tokens: int
    true_len: int  # tokens it generates before its EOS (<= max_tokens)
    arrived_at: float
    generated: int = 0
    kv_worker_id: str | None = None
    finished_at: float | None = None
    num_preempted: int = 0

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.generated

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens - self.generated

    def view(self) -> WaitingRequest:
        return WaitingRequest(
            self.request_id,
            self.context_len,
            self.prompt_len,
            self.generated,
            self.max_new_tokens,
            self.arrived_at,
            self.kv_worker_id,
        )

    def advance(self, steps: int) -> bool:
        """Generate up to ``steps`` tokens; True when the request is done."""
        self.generated += min(steps, self.true_len - self.generated)
        return self.generated >= self.true_len


@dataclass
class SimWorker:
    worker_id: str
    cost: CostModel
    queue: list[tuple[Dispatch, list[SimRequest]]] = field(default_factory=list)
    batch: list[SimRequest] = field(default_factory=list)  # the running sequential batch
    batch_end_at: float = 0.0
    joined: list[SimRequest] = field(default_factory=list)  # running join rows, oldest first
    step_end_at: float = 0.0
    peak_bytes: int = 0  # the most KV this worker ever held (slack included)
    budgets: dict[str, int] = field(default_factory=dict)  # steps each batch row will run
    join_steps: dict[str, int] = field(default_factory=dict)  # steps left in each join's dispatch

    @property
    def busy(self) -> bool:
        return bool(self.batch or self.joined or self.queue)

    def view(self, now: float) -> WorkerView:
        queued = [r for _, rows in self.queue for r in rows]
        running = tuple(
            RunningRequest(
                r.request_id,
                r.context_len,
                r.max_new_tokens,
                0,
                self.join_steps.get(r.request_id, 0),
                r.arrived_at,
            )
            for r in [*self.batch, *queued, *self.joined]
        )
        busy_until = max(self.batch_end_at, now) if self.batch else now
        busy_until += sum(d.predicted_s for d, _ in self.queue)
        return WorkerView(self.worker_id, self.cost, busy_until, len(self.queue), running, 0)

    def next_event_at(self) -> float | None:
        if self.batch:
            return self.batch_end_at
        if self.joined:
            return self.step_end_at
        return None

    def _note_kv(self, num_rows: int, num_cols: int) -> None:
        mem = self.cost.memory
        used = num_rows * (num_cols + mem.slack_tokens) * mem.kv_bytes_per_token
        self.peak_bytes = max(self.peak_bytes, used)

    def start_next(self, now: float) -> None:
        """Start the next queued batch if nothing runs (a sequential batch waits for joins)."""
        if self.batch or self.joined or not self.queue:
            return
        dispatch, rows = self.queue.pop(0)
        steps = [min(dispatch.max_steps, r.max_new_tokens, r.true_len - r.generated) for r in rows]
        prefill = sum(1 for r in rows if r.kv_worker_id != self.worker_id)
        padded = max(r.context_len for r in rows)
        self._note_kv(len(rows), padded + max(steps))
        self.batch = rows
        self.batch_end_at = now + self.cost.time.slice_s(
            len(rows), padded, max(steps), prefill, step_lens=steps
        )
        self.budgets = dict(zip((r.request_id for r in rows), steps, strict=True))

    def finish_batch(self, keep_kv: bool) -> tuple[list[SimRequest], list[SimRequest]]:
        done, back = [], []
        for r in self.batch:
            budget = self.budgets[r.request_id]
            (done if r.advance(budget) else back).append(r)
            r.kv_worker_id = self.worker_id if keep_kv else None
        self.batch = []
        return done, back

    def step(self, preempt: bool, keep_kv: bool) -> tuple[list[SimRequest], list[SimRequest]]:
        """One decode step of the join rows; optimistic admission may need to preempt; a row
        whose dispatch's steps are used goes back (its KV kept here with ``keep_kv``)."""
        back: list[SimRequest] = []
        mem = self.cost.memory
        while preempt and self.joined:
            width = max(r.context_len for r in self.joined) + 1 + mem.slack_tokens
            if len(self.joined) * width * mem.kv_bytes_per_token <= mem.budget_bytes:
                break
            victim = self.joined.pop()  # the newest
            self.join_steps.pop(victim.request_id, None)
            victim.num_preempted += 1
            back.append(victim)
        done = [r for r in self.joined if r.advance(1)]
        for r in self.joined:
            self.join_steps[r.request_id] -= 1
            if r not in done and self.join_steps[r.request_id] == 0:
                r.kv_worker_id = self.worker_id if keep_kv else None
                back.append(r)
        self.joined = [r for r in self.joined if r not in done and r not in back]
        for r in [*done, *back]:
            self.join_steps.pop(r.request_id, None)
        if self.joined:
            self._note_kv(len(self.joined), max(r.context_len for r in self.joined))
        return done, back

    def schedule_step(self, now: float) -> None:
        if self.joined:
            width = max(r.context_len for r in self.joined)
            self.step_end_at = now + self.cost.time.decode_step_s(len(self.joined), width)


class Driver:
    """Runs one policy over a workload until every request finishes (or the time is up)."""

    def __init__(
        self,
        policy: Policy,
        workers: Sequence[tuple[str, CostModel]],
        requests: Sequence[SimRequest],
        keep_kv: bool = False,
        preempt: bool = False,
    ) -> None:
        self.policy = policy
        self.workers = [SimWorker(wid, cost) for wid, cost in workers]
        self.arrivals = sorted(requests, key=lambda r: r.arrived_at)
        self.requests = list(requests)
        self.waiting: dict[str, SimRequest] = {}
        self.keep_kv = keep_kv
        self.preempt = preempt
        self.num_rounds = 0
        self.num_renewed = 0  # slices renewed in place (continuous SCLS)

    def run(self, max_time_s: float, max_rounds: int = 200_000) -> float:
        now = 0.0
        while any(r.finished_at is None for r in self.requests):
            while self.arrivals and self.arrivals[0].arrived_at <= now:
                r = self.arrivals.pop(0)
                self.waiting[r.request_id] = r
            self._plan(now)
            events = [t for w in self.workers if (t := w.next_event_at()) is not None]
            events += [self.arrivals[0].arrived_at] if self.arrivals else []
            if not events:
                stuck = sorted(self.waiting)[:5]
                raise AssertionError(f"{self.policy.name}: stuck at {now:.3f}s, waiting {stuck}")
            now = max(now, min(events))
            if now > max_time_s or self.num_rounds > max_rounds:
                raise AssertionError(f"{self.policy.name}: not done by {now:.1f}s")
            for w in self.workers:
                self._advance(w, now)
        return now

    def _plan(self, now: float) -> None:
        views = [w.view(now) for w in self.workers]
        waiting = [r.view() for r in self.waiting.values()]
        plan = self.policy.schedule(waiting, views, now)
        self.num_rounds += 1
        check_plan(self.policy, plan, waiting, views, now)
        by_id = {w.worker_id: w for w in self.workers}
        for d in plan:
            worker = by_id[d.worker_id]
            if d.renew:  # longer slices for rows running there
                self.num_renewed += len(d.request_ids)
                for r in worker.joined:
                    if r.request_id in d.request_ids:
                        left = worker.join_steps[r.request_id]
                        worker.join_steps[r.request_id] += min(d.max_steps, r.max_new_tokens - left)
                continue
            rows = [self.waiting.pop(rid) for rid in d.request_ids]
            if d.join:
                # Joining rows without KV here are prefilled first (each on its own, as the
                # worker's length-sorted chunks roughly do): the next step ends that much later.
                prefill_s = sum(
                    worker.cost.time.prefill_s(1, r.context_len)
                    for r in rows
                    if r.kv_worker_id != d.worker_id and r.request_id not in d.handoff_ids
                )
                worker.joined += rows
                for r in rows:
                    worker.join_steps[r.request_id] = min(d.max_steps, r.max_new_tokens)
                if worker.step_end_at <= now:
                    worker.schedule_step(now)
                worker.step_end_at += prefill_s
            else:
                worker.queue.append((d, rows))
            for r in rows:  # a handoff brings the KV along; any other move recomputes
                kept = r.kv_worker_id == d.worker_id or r.request_id in d.handoff_ids
                r.kv_worker_id = d.worker_id if kept else None
            worker.start_next(now)

    def _advance(self, w: SimWorker, now: float) -> None:
        done: list[SimRequest] = []
        back: list[SimRequest] = []
        if w.batch and w.batch_end_at <= now:
            done, back = w.finish_batch(self.keep_kv)
        elif w.joined and w.step_end_at <= now:
            done, back = w.step(self.preempt, self.keep_kv)
            w.schedule_step(now)
        for r in done:
            r.finished_at = now
            r.kv_worker_id = None
        for r in back:
            self.waiting[r.request_id] = r
        w.start_next(now)
        assert w.peak_bytes <= w.cost.memory.budget_bytes or self.preempt, (
            f"{w.worker_id} held {w.peak_bytes} B of KV, budget {w.cost.memory.budget_bytes} B"
        )
