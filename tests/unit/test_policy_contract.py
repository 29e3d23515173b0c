"""Property tests: every policy's plan honours the Policy contract on random queues and worker
states (no request twice, memory within budget, step budgets, one queued batch per worker)."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.config import SchedulerConfig
from engine.scheduler.base import WaitingRequest, WorkerView
from engine.scheduler.factory import make_policy
from engine.scheduler.ils import ILSPolicy
from engine.scheduler.scls import SCLSPolicy
from engine.scheduler.sls import SLSPolicy

from .contract import check_plan
from .strategies import NOW, configs, waiting_queues, worker_views

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def rounds(
    draw: st.DrawFn, min_tokens: int = 64
) -> tuple[SchedulerConfig, list[WaitingRequest], list[WorkerView]]:
    cfg = draw(configs())
    views = draw(worker_views(draw(st.integers(1, 4)), min_tokens))
    waiting = draw(waiting_queues([w.worker_id for w in views], cfg.max_gen_len))
    return cfg, waiting, views


@PROPERTY
@given(rounds())
def test_every_plan_honours_the_contract(case) -> None:
    cfg, waiting, views = case
    policy = make_policy(cfg)
    plan = policy.schedule(waiting, views, NOW)
    check_plan(policy, plan, waiting, views, NOW)


def _fits_alone(policy, worker: WorkerView, r: WaitingRequest) -> bool:
    mem = worker.cost.memory
    if isinstance(policy, SLSPolicy):
        return mem.fits(1, r.context_len, policy.max_gen_len)
    if isinstance(policy, ILSPolicy):
        return mem.fits(1, r.context_len, max(r.max_new_tokens, policy.headroom_tokens))
    return mem.fits(1, r.context_len, r.max_new_tokens)


@PROPERTY
@given(rounds(min_tokens=1100))
def test_an_idle_worker_gets_work_when_some_request_can_run(case) -> None:
    """Liveness of one round: with an idle worker and a waiting request that is not held by a
    busy worker and that fits every worker alone, the plan is not empty."""
    cfg, waiting, views = case
    policy = make_policy(cfg)
    idle = [w for w in views if not w.running and w.num_queued_batches == 0]
    busy_ids = {w.worker_id for w in views} - {w.worker_id for w in idle}
    runnable = [
        r
        for r in waiting
        if r.kv_worker_id not in busy_ids and all(_fits_alone(policy, w, r) for w in views)
    ]
    if not idle or not runnable or len(runnable) < len(waiting):
        return
    event("liveness checked")
    assert policy.schedule(waiting, views, NOW)


@PROPERTY
@given(rounds())
def test_scls_slices_never_exceed_s_and_go_only_to_ready_workers(case) -> None:
    cfg, waiting, views = case
    policy = make_policy(SchedulerConfig(**{**_as_dict(cfg), "policy": "scls:strict"}))
    assert isinstance(policy, SCLSPolicy)
    by_worker = {w.worker_id: w for w in views}
    for d in policy.schedule(waiting, views, NOW):
        assert 1 <= d.max_steps <= cfg.slice_len
        assert not d.join
        assert policy.is_ready(by_worker[d.worker_id], NOW)


@settings(max_examples=50, deadline=None)
@given(rounds())
def test_planning_is_pure(case) -> None:
    """Planning twice on the same input gives the same plan (nothing hidden is mutated)."""
    cfg, waiting, views = case
    for name in ("scls", "scls:strict", "ils", "sls"):
        policy = make_policy(SchedulerConfig(**{**_as_dict(cfg), "policy": name}))
        assert policy.schedule(waiting, views, NOW) == policy.schedule(waiting, views, NOW)


def _as_dict(cfg: SchedulerConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
