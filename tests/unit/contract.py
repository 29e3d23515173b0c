"""The Policy contract of engine/scheduler/base.py as executable checks, with the memory
bounds recomputed independently (by brute force over decode steps where it matters)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from engine.scheduler.base import Dispatch, Policy, WaitingRequest, WorkerView
from engine.scheduler.continuous import ContinuousSCLSPolicy
from engine.scheduler.ils import ILSPolicy
from engine.scheduler.scls import SCLSPolicy
from engine.scheduler.sls import SLSPolicy

from .brute import brute_running_peak


def check_plan(
    policy: Policy,
    plan: Sequence[Dispatch],
    waiting: Sequence[WaitingRequest],
    views: Sequence[WorkerView],
    now: float,
) -> None:
    by_id = {r.request_id: r for r in waiting}
    workers = {w.worker_id: w for w in views}
    seen: set[str] = set()
    sequential: Counter[str] = Counter()
    renewed = _check_renewals(policy, plan, workers)
    for d in [d for d in plan if not d.renew]:
        assert d.worker_id in workers, f"unknown worker {d.worker_id}"
        assert d.request_ids, "empty dispatch"
        assert d.max_steps >= 1
        assert len(set(d.request_ids)) == len(d.request_ids), "a request twice in one batch"
        assert not seen & set(d.request_ids), "a request in two dispatches"
        seen.update(d.request_ids)
        members = [by_id[rid] for rid in d.request_ids]  # KeyError: not a waiting request
        assert d.padded_len == max(r.context_len for r in members)
        assert math.isfinite(d.predicted_s) and d.predicted_s >= 0
        worker = workers[d.worker_id]
        for rid in d.handoff_ids:  # pulled from a live holder that is not the target
            assert rid in d.request_ids, f"handoff of {rid}, which is not in the batch"
            assert by_id[rid].kv_worker_id in set(workers) - {d.worker_id}, f"handoff of {rid}"
        if d.join:
            _check_join(policy, d, worker, members)
        else:
            sequential[d.worker_id] += 1
            _check_sequential(policy, d, worker, members, now)
    assert all(n == 1 for n in sequential.values()), f"several batches for one worker: {sequential}"
    if isinstance(policy, ContinuousSCLSPolicy):
        _check_reservations(plan, by_id, workers, renewed)


def _check_sequential(
    policy: Policy, d: Dispatch, worker: WorkerView, members: list[WaitingRequest], now: float
) -> None:
    mem = worker.cost.memory
    assert worker.num_queued_batches == 0, "a second queued batch"
    n = len(members)
    if isinstance(policy, SLSPolicy):
        assert not worker.running, "SLS dispatched to a busy worker"
        assert d.max_steps == policy.max_gen_len
        assert d.predicted_peak_bytes == mem.batch_peak_bytes(n, d.padded_len, policy.max_gen_len)
        assert n <= policy.max_batch_size
    elif isinstance(policy, SCLSPolicy):
        assert policy.is_ready(worker, now), "SCLS dispatched to a worker not about to be idle"
        assert 1 <= d.max_steps <= policy.slice_len
        assert d.max_steps == min(policy.slice_len, max(r.max_new_tokens for r in members))
        assert d.predicted_peak_bytes == mem.batch_peak_bytes(n, d.padded_len, d.max_steps)
        assert n <= policy.max_batch_size
    else:
        raise AssertionError(f"{policy.name} made a sequential dispatch")
    assert d.predicted_peak_bytes <= mem.budget_bytes, "predicted peak above the budget"


def _check_renewals(
    policy: Policy, plan: Sequence[Dispatch], workers: dict[str, WorkerView]
) -> dict[str, dict[str, int]]:
    """Renewals extend slices of requests running on that worker that end soon and are not
    done by then, by at most S steps; returns each worker's renewed requests and their new
    steps left."""
    out: dict[str, dict[str, int]] = {}
    for d in plan:
        if not d.renew:
            continue
        assert isinstance(policy, ContinuousSCLSPolicy), f"{policy.name} renewed a slice"
        assert 1 <= d.max_steps <= policy.slice_len
        running = {r.request_id: r for r in workers[d.worker_id].running}
        renewed = out.setdefault(d.worker_id, {})
        for rid in d.request_ids:
            r = running[rid]  # KeyError: not running there
            assert rid not in renewed, "renewed twice"
            assert 0 < r.slice_steps_left <= max(policy.renew_within_steps, policy.slice_len)
            assert r.max_new_tokens > r.slice_steps_left, "renewed a request about to finish"
            extra = min(d.max_steps, r.max_new_tokens - r.slice_steps_left)
            renewed[rid] = r.slice_steps_left + extra
    return out


def _check_join(
    policy: Policy, d: Dispatch, worker: WorkerView, members: list[WaitingRequest]
) -> None:
    if isinstance(policy, ContinuousSCLSPolicy):  # reservations: checked per worker after
        assert 1 <= d.max_steps <= policy.slice_len
        assert d.max_steps == max(min(d.max_steps, r.max_new_tokens) for r in members)
        return
    assert isinstance(policy, ILSPolicy), f"{policy.name} made a join dispatch"
    mem = worker.cost.memory
    rows = [(r.context_len, r.max_new_tokens) for r in worker.running]
    rows += [(r.context_len, r.max_new_tokens) for r in members]
    assert len(rows) <= policy.max_rows, "running set above max_concurrency / max_batch_size"
    assert d.max_steps == max(r.max_new_tokens for r in members)
    if policy.admission == "reserve":
        peak = expected_peak(mem, rows)
        assert d.predicted_peak_bytes == peak
    elif mem.block_tokens:
        peak = expected_peak(mem, [(c, policy.headroom_tokens) for c, _ in rows])
    else:
        width = max(c for c, _ in rows) + policy.headroom_tokens + mem.slack_tokens
        peak = len(rows) * width * mem.kv_bytes_per_token
    assert peak <= mem.budget_bytes, "admission above the budget"


def expected_peak(mem, rows: Sequence[tuple[int, int]]) -> int:
    """KV a running set of (context_len, steps left) holds at most: each row's own whole blocks
    of KV at its end on a paged cache, else brute force over one left-padded cache."""
    if not mem.block_tokens:
        return brute_running_peak(mem, rows)
    blocks = sum(math.ceil((c - 1 + m) / mem.block_tokens) for c, m in rows)
    return blocks * mem.block_tokens * mem.kv_bytes_per_token


def _check_reservations(
    plan: Sequence[Dispatch],
    by_id: dict[str, WaitingRequest],
    workers: dict[str, WorkerView],
    renewed: dict[str, dict[str, int]],
) -> None:
    """Continuous SCLS: per worker, the reservations held (renewed ones grown), plus each
    newcomer's (min(max_steps, what it may generate) steps), recomputed independently: their
    honest peak is what every dispatch to that worker predicts, and within the budget."""
    for worker_id, worker in workers.items():
        mine = [d for d in plan if d.worker_id == worker_id]
        if not mine:
            continue
        grown = renewed.get(worker_id, {})
        rows = [(r.context_len, grown.get(r.request_id, r.steps_left)) for r in worker.running]
        for d in mine:
            if d.join and not d.renew:
                rows += [
                    (by_id[rid].context_len, min(d.max_steps, by_id[rid].max_new_tokens))
                    for rid in d.request_ids
                ]
        peak = expected_peak(worker.cost.memory, rows)
        assert all(d.predicted_peak_bytes == peak for d in mine), (peak, mine)
        assert peak <= worker.cost.memory.budget_bytes, "reservations above the budget"
