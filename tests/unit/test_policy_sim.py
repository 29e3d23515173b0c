"""Driver-loop tests: under every policy, every request eventually finishes, no worker ever holds
more KV than its budget (optimistic ILS preempts instead), and aging stops starvation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import SchedulerConfig
from engine.cost_model import CostModel, MemoryModel, TimeModel
from engine.scheduler.factory import make_policy
from engine.scheduler.scls import SCLSPolicy

from .sim import Driver, SimRequest

MAX_PROMPT, MAX_GEN = 200, 120
SIZES = (1, 1, 2, 3, 5, 8, 20)  # budgets in requests that fit alone: mostly tight

CONFIGS = {
    **{
        f"scls-{mode}": SchedulerConfig(
            policy="scls", slice_len=16, max_gen_len=MAX_GEN, kv_mode=mode, aging_s=2.0
        )
        for mode in ("keep", "auto", "recompute")
    },
    "strict-keep": SchedulerConfig(
        policy="scls:strict", slice_len=16, max_gen_len=MAX_GEN, kv_mode="keep", aging_s=2.0
    ),
    "strict-auto": SchedulerConfig(
        policy="scls:strict", slice_len=16, max_gen_len=MAX_GEN, kv_mode="auto", aging_s=2.0
    ),
    "strict-recompute": SchedulerConfig(
        policy="scls:strict", slice_len=16, max_gen_len=MAX_GEN, kv_mode="recompute", aging_s=2.0
    ),
    "ils-reserve": SchedulerConfig(policy="ils", max_gen_len=MAX_GEN, max_concurrency=12),
    "ils-optimistic": SchedulerConfig(
        policy="ils", max_gen_len=MAX_GEN, ils_admission="optimistic"
    ),
    "sls": SchedulerConfig(policy="sls", max_gen_len=MAX_GEN, max_batch_size=16),
}


def workload(seed: int, num: int) -> list[SimRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        max_tokens = rng.randint(1, MAX_GEN)
        out.append(
            SimRequest(
                request_id=f"r{i}",
                prompt_len=rng.randint(1, MAX_PROMPT),
                max_tokens=max_tokens,
                true_len=rng.randint(1, max_tokens),
                arrived_at=rng.uniform(0.0, 5.0),
            )
        )
    return out


def workers(seed: int, num: int) -> list[tuple[str, CostModel]]:
    """Budgets from one request alone (the worst case fits) to several dozen of them."""
    rng = random.Random(seed)
    alone = MAX_PROMPT + 2 * MAX_GEN + 32  # SLS sizes for prompt + generated + L
    return [
        (f"w{i}", CostModel(TimeModel.default(), MemoryModel(2, 2 * alone * rng.choice(SIZES))))
        for i in range(num)
    ]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), num_workers=st.integers(1, 3), num_requests=st.integers(1, 40))
def test_every_request_finishes(name: str, seed: int, num_workers: int, num_requests: int) -> None:
    cfg = CONFIGS[name]
    requests = workload(seed, num_requests)
    driver = Driver(
        make_policy(cfg),
        workers(seed, num_workers),
        requests,
        keep_kv=cfg.policy.startswith("scls") and cfg.kv_mode != "recompute",
        preempt=cfg.ils_admission == "optimistic" and cfg.policy == "ils",
    )
    driver.run(max_time_s=3600.0)
    assert all(r.finished_at is not None and r.generated == r.true_len for r in requests)


def starvation_case(aging_s: float, policy: str = "scls:strict") -> tuple[float, float]:
    """One long request waits while short ones keep arriving for 30 s on one worker; returns
    when the long one finished and when the last short one did."""
    cfg = SchedulerConfig(
        policy=policy, slice_len=16, max_gen_len=64, aging_s=aging_s, kv_mode="keep"
    )
    long = SimRequest("long", prompt_len=900, max_tokens=64, true_len=64, arrived_at=0.0)
    shorts = [
        SimRequest(f"s{i}", prompt_len=8, max_tokens=4, true_len=4, arrived_at=0.01 + 0.05 * i)
        for i in range(600)
    ]
    cost = CostModel(TimeModel.default(), MemoryModel(1, 4000))
    driver = Driver(make_policy(cfg), [("w0", cost)], [long, *shorts], keep_kv=True)
    driver.run(max_time_s=3600.0)
    assert long.finished_at is not None
    return long.finished_at, max(s.finished_at or 0.0 for s in shorts)


def test_aging_stops_a_long_request_from_starving() -> None:
    long_done_at, shorts_done_at = starvation_case(aging_s=1.0)
    assert long_done_at < 10.0 < shorts_done_at
    # Without aging the long request waits until the stream of short ones dries up.
    long_done_at, shorts_done_at = starvation_case(aging_s=1e9)
    assert long_done_at > 25.0


def test_continuous_scls_renews_slices_in_place_and_never_preempts() -> None:
    """With room to spare, running requests' slices are renewed one boundary ahead, so they
    run on without going back to the pool; nobody is preempted."""
    cfg = SchedulerConfig(policy="scls", slice_len=8, max_gen_len=MAX_GEN, kv_mode="auto")
    requests = [
        SimRequest(f"r{i}", prompt_len=20, max_tokens=60, true_len=60, arrived_at=0.01 * i)
        for i in range(6)
    ]
    cost = CostModel(TimeModel.default(), MemoryModel(1, 10_000, block_tokens=16))
    driver = Driver(make_policy(cfg), [("w0", cost), ("w1", cost)], requests, keep_kv=True)
    driver.run(max_time_s=3600.0)
    assert all(r.generated == 60 and r.num_preempted == 0 for r in requests)
    assert driver.num_renewed >= 6 * (60 // 8 - 1)  # every boundary but the last, or nearly


@pytest.mark.parametrize("aging_s", [1.0, 1e9])
def test_continuous_scls_serves_the_oldest_first(aging_s: float) -> None:
    """Continuous SCLS places requests oldest first: the long one starts at once and its
    slices are renewed before any younger short one, with or without aging."""
    long_done_at, shorts_done_at = starvation_case(aging_s, policy="scls")
    assert long_done_at < 10.0 < shorts_done_at


def test_scls_forms_batches_as_late_as_is_safe() -> None:
    """A worker busy for longer than its lookahead gets nothing yet (recompute mode); one
    about to finish gets exactly one queued batch."""
    policy = SCLSPolicy(slice_len=16, max_batch_size=8, aging_s=10.0, kv_mode="recompute")
    cost = CostModel(TimeModel.default(), MemoryModel(1, 10_000))
    requests = workload(1, 5)
    sim = Driver(policy, [("w0", cost)], requests)
    worker = sim.workers[0]
    view = worker.view(0.0)
    assert policy.is_ready(view, 0.0)
    from engine.scheduler.base import RunningRequest, WorkerView

    busy = WorkerView("w0", cost, 1.0, 0, (RunningRequest("x", 10, 5, 15),), 0)
    assert not policy.is_ready(busy, 0.0)
    assert policy.is_ready(busy, 1.0 - 0.004)
    queued = WorkerView("w0", cost, 0.0, 1, (RunningRequest("x", 10, 5, 15),), 0)
    assert not policy.is_ready(queued, 5.0)
    keep = SCLSPolicy(slice_len=16, max_batch_size=8, aging_s=10.0, kv_mode="keep")
    assert not keep.is_ready(busy, 1.0)  # keep mode waits for the survivors to park


def test_optimistic_ils_preempts_when_memory_runs_out_and_still_finishes() -> None:
    cfg = SchedulerConfig(policy="ils", max_gen_len=200, ils_admission="optimistic")
    requests = [
        SimRequest(f"r{i}", prompt_len=20, max_tokens=200, true_len=200, arrived_at=0.0)
        for i in range(12)
    ]
    cost = CostModel(TimeModel.default(), MemoryModel(1, 12 * (20 + 16 + 32) + 400))
    driver = Driver(make_policy(cfg), [("w0", cost)], requests, preempt=True)
    driver.run(max_time_s=3600.0)
    assert sum(r.num_preempted for r in requests) > 0
    assert all(r.generated == r.true_len for r in requests)
