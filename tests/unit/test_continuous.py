"""Continuous SCLS placement details: near-ties share the load, elastic slices when memory is
tight, a slower worker gets fewer rows."""

from __future__ import annotations

import msgspec

from engine.cost_model import CostModel, MemoryModel, TimeModel
from engine.scheduler.base import RunningRequest, WaitingRequest, WorkerView
from engine.scheduler.continuous import ContinuousSCLSPolicy

KV = 1  # bytes per token: budgets below are in tokens


def worker(worker_id: str, budget: int, scale: float = 1.0, busy_until: float = 0.0, running=()):
    base = TimeModel.default()
    time = TimeModel(base.prefill, tuple(d * scale for d in base.decode))
    cost = CostModel(time, MemoryModel(KV, budget, block_tokens=16))
    return WorkerView(worker_id, cost, busy_until, 0, tuple(running), 0)


def waiting(n: int, context_len: int = 40, max_new: int = 100) -> list[WaitingRequest]:
    return [
        WaitingRequest(f"r{i}", context_len, context_len, 0, max_new, 0.1 * i) for i in range(n)
    ]


def placed(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in plan:
        out[d.worker_id] = out.get(d.worker_id, 0) + len(d.request_ids)
    return out


def test_near_ties_share_the_load_between_idle_workers():
    """Two idle workers whose fitted models differ by 1%: requests alternate instead of all
    going to the nominally faster one."""
    policy = ContinuousSCLSPolicy(slice_len=32, max_batch_size=64, aging_s=10.0)
    workers = [worker("fast", 10_000, 0.99), worker("slow", 10_000, 1.0)]
    assert placed(policy.schedule(waiting(6), workers, 1.0)) == {"fast": 3, "slow": 3}
    # one at a time: the worker whose dispatched work ends first takes the next
    busy = [worker("fast", 10_000, 0.99, busy_until=2.0), worker("slow", 10_000, 1.0)]
    assert placed(policy.schedule(waiting(1), busy, 1.0)) == {"slow": 1}


def test_a_twice_slower_worker_gets_fewer_rows():
    policy = ContinuousSCLSPolicy(slice_len=32, max_batch_size=64, aging_s=10.0)
    workers = [worker("fast", 100_000, 1.0), worker("slow", 100_000, 2.0)]
    got = placed(policy.schedule(waiting(40), workers, 1.0))
    assert got["fast"] > 2 * got.get("slow", 0) and sum(got.values()) == 40


def test_a_slice_that_does_not_fit_whole_is_granted_shorter():
    """Room for 64 more tokens: a 40-token context (39 in its KV) gets the 25 steps that fit in
    four blocks instead of waiting for a whole 32-step slice; with room for only 4 steps (fewer
    than a quarter of a slice) it waits."""
    policy = ContinuousSCLSPolicy(slice_len=32, max_batch_size=64, aging_s=10.0)
    held = RunningRequest("old", 40, 100, 0, 16, 0.0)  # 39 + 16 = 55 -> 64 tokens held
    plan = policy.schedule(waiting(1), [worker("w", 64 + 64, running=[held])], 1.0)
    assert len(plan) == 1 and plan[0].max_steps == 25 and plan[0].predicted_peak_bytes == 128
    tight = policy.schedule(waiting(1, context_len=45), [worker("w", 64 + 48, running=[held])], 1.0)
    assert tight == []


def test_a_worker_reporting_every_few_steps_is_renewed_that_much_earlier():
    """With --stream-interval k a running request may be k - 1 steps further than the broker's
    view says: its renewal comes k - 1 steps earlier, so it still reaches the worker in time."""
    policy = ContinuousSCLSPolicy(slice_len=32, max_batch_size=64, aging_s=10.0)
    policy.renew_lookahead_s = 0.0  # renew within renew_within_steps (2) steps of the boundary
    row = RunningRequest("run", 40, 100, 0, 5, 0.0)  # 5 steps left in its slice, as reported
    every_step = worker("w", 100_000, running=[row])
    assert policy.schedule([], [every_step], 1.0) == []
    every_fourth = msgspec.structs.replace(every_step, stream_interval=4)
    [renewal] = policy.schedule([], [every_fourth], 1.0)
    assert renewal.renew and renewal.request_ids == ("run",)
