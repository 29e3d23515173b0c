"""Hypothesis strategies for random queues, worker states and scheduler configs."""

from __future__ import annotations

from hypothesis import strategies as st

from engine.config import SchedulerConfig
from engine.cost_model import CostModel, MemoryModel, TimeModel
from engine.scheduler.base import RunningRequest, WaitingRequest, WorkerView

NOW = 100.0


@st.composite
def time_models(draw: st.DrawFn) -> TimeModel:
    if draw(st.booleans()):
        return TimeModel.default()
    coef = st.floats(0.0, 1e-2, allow_nan=False)
    prefill = [draw(coef) for _ in range(4)] + [draw(st.floats(0.0, 1e-6))]
    decode = [draw(coef) for _ in range(3)] + [draw(st.floats(1e-4, 5e-2))]
    return TimeModel(prefill, decode)


@st.composite
def cost_models(draw: st.DrawFn, min_tokens: int = 64) -> CostModel:
    kv = draw(st.integers(1, 64))
    slack = draw(st.integers(0, 32))
    budget_tokens = draw(st.integers(min_tokens + slack, 20_000))
    block_tokens = draw(st.sampled_from([0, 0, 1, 16]))  # 0: a left-padded cache
    return CostModel(draw(time_models()), MemoryModel(kv, budget_tokens * kv, slack, block_tokens))


@st.composite
def configs(draw: st.DrawFn) -> SchedulerConfig:
    return SchedulerConfig(
        policy=draw(st.sampled_from(["scls", "scls:strict", "ils", "sls"])),
        slice_len=draw(st.integers(1, 64)),
        max_gen_len=draw(st.integers(1, 300)),
        kv_mode=draw(st.sampled_from(["auto", "keep", "recompute"])),
        ils_admission=draw(st.sampled_from(["reserve", "optimistic"])),
        max_concurrency=draw(st.none() | st.integers(1, 40)),
        max_batch_size=draw(st.integers(1, 64)),
        aging_s=draw(st.floats(0.0, 20.0)),
    )


@st.composite
def running_sets(draw: st.DrawFn) -> tuple[RunningRequest, ...]:
    rows = draw(st.lists(st.tuples(st.integers(1, 400), st.integers(1, 300)), max_size=6))
    return tuple(RunningRequest(f"run{i}", c, m, c + m) for i, (c, m) in enumerate(rows))


@st.composite
def worker_views(draw: st.DrawFn, num: int, min_tokens: int = 64) -> list[WorkerView]:
    """``num`` workers; with ``min_tokens`` > 64 the first one is idle."""
    views = []
    for i in range(num):
        running = () if i == 0 and min_tokens > 64 else draw(running_sets())
        views.append(
            WorkerView(
                worker_id=f"w{i}",
                cost=draw(cost_models(min_tokens)),
                busy_until=NOW + draw(st.floats(-5.0, 5.0)) if running else NOW - 1.0,
                num_queued_batches=draw(st.integers(0, 1)) if running else 0,
                running=running,
                parked_kv_bytes=0,
            )
        )
    return views


@st.composite
def waiting_queues(
    draw: st.DrawFn, worker_ids: list[str], max_gen_len: int, max_size: int = 60
) -> list[WaitingRequest]:
    holders = st.sampled_from([None, None, "gone", *worker_ids])
    out = []
    for i in range(draw(st.integers(0, max_size))):
        prompt_len = draw(st.integers(1, 400))
        max_tokens = draw(st.integers(1, max_gen_len))
        generated = draw(st.integers(0, max_tokens - 1))
        out.append(
            WaitingRequest(
                request_id=f"r{i}",
                context_len=prompt_len + generated,
                prompt_len=prompt_len,
                num_generated=generated,
                max_new_tokens=max_tokens - generated,
                arrived_at=NOW - draw(st.floats(0.0, 30.0)),
                kv_worker_id=(holder := draw(holders) if generated else None),
                kv_on_host=holder is not None and draw(st.booleans()),
            )
        )
    return out
