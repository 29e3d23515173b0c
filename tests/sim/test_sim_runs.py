"""Whole simulations: every request finishes exactly once under every policy, no worker ever
holds more KV than its budget, the same seed gives the same run, and 10,000 requests pass."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from engine import protocol as p
from engine.config import SchedulerConfig
from engine.sim.cluster import SimItem, Simulation
from engine.sim.devices import device_model

GIB = 2**30
POLICIES = {
    "scls": SchedulerConfig(),
    "scls:keep": SchedulerConfig(kv_mode="keep"),
    "scls:recompute": SchedulerConfig(kv_mode="recompute"),
    "scls:strict": SchedulerConfig(policy="scls:strict"),
    "scls:strict:keep": SchedulerConfig(policy="scls:strict", kv_mode="keep"),
    "ils": SchedulerConfig(policy="ils"),
    "ils:optimistic": SchedulerConfig(policy="ils", ils_admission="optimistic"),
    "sls": SchedulerConfig(policy="sls"),
}


class CountingSimulation(Simulation):
    """Observes every reply the simulated client receives (the replies are still handled)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.finished: dict[str, int] = {}

    def _to_client(self, msg, now: float) -> None:
        if isinstance(msg, p.Finished | p.Error):
            self.finished[msg.request_id] = self.finished.get(msg.request_id, 0) + 1
        super()._to_client(msg, now)


def load(n: int, seed: int, hidden: int | None = None) -> tuple[list[SimItem], list[float]]:
    rng = random.Random(seed)
    items = [
        SimItem(i, rng.randint(8, 700), max(1, int(rng.lognormvariate(4.0, 1.0))) % 256 + 1, hidden)
        for i in range(n)
    ]
    times, t = [], 0.0
    for _ in items:
        times.append(t)
        t += rng.expovariate(40.0)
    return items, times


def small_cluster():
    """Two unlike instances with small KV budgets, so that memory binds: slices park, KV is
    evicted and offloaded, optimistic ILS preempts."""
    a100 = device_model("a100-80gb:llama-3-8b", kv_budget_bytes=GIB // 4)
    h100 = device_model("h100-80gb:llama-3-8b", kv_budget_bytes=GIB // 4)
    return [replace(a100, host_kv_budget_bytes=GIB // 8), h100]


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("hidden", [None, 256])
def test_every_request_finishes_exactly_once_within_budget(name: str, hidden: int | None) -> None:
    items, times = load(150, seed=3, hidden=hidden)
    cfg = replace(POLICIES[name], max_gen_len=256, slice_len=32)
    sim = CountingSimulation(cfg, small_cluster())
    out = sim.run(items, times)
    assert all(r.success for r in out.records), [r.finish_reason for r in out.records][:5]
    assert [r.num_output_tokens for r in out.records] == [it.output_len for it in items]
    if hidden is None:  # known lengths: exactly one Finished per request
        assert sim.finished == {r.request_id: 1 for r in out.records}
    else:  # the client ended each at its length; the broker then answers the cancel once
        assert all(n <= 1 for n in sim.finished.values())
    core = sim.core
    assert not core.requests and not core.waiting
    assert core.num_finished + (hidden is not None) * len(items) >= len(items)
    generated = sum(b["generated_tokens"] for b in out.batches)
    counted = sum(r.num_output_tokens + r.excess_tokens for r in out.records)
    if hidden is None:  # every token a worker produced reached the client, once
        assert generated == counted
    else:  # tokens of the step in flight when the client's cancel landed are dropped
        assert counted <= generated <= counted + 2 * len(items)
    for w in sim.workers:  # nothing left running; every block free or parked
        assert w.num_running == 0
        assert w.pool.used_bytes <= w.device.kv_budget_bytes
    budgets = {w.worker_id: w.device.kv_budget_bytes for w in sim.workers}
    assert all(b["measured_peak_bytes"] <= budgets[b["worker_id"]] for b in out.batches)
    if name != "ils:optimistic":  # reservations that fit the budget never preempt
        assert core.num_preempted == 0


@pytest.mark.parametrize("name", ["scls", "ils", "scls:strict"])
def test_workers_that_report_every_few_steps_lose_nothing(name: str) -> None:
    """--stream-interval 4: every request still finishes once with all its tokens, within the
    budget and (but for optimistic ILS) without a preemption, in fewer messages."""
    items, times = load(150, seed=3)
    cfg = replace(POLICIES[name], max_gen_len=256, slice_len=32)
    counts = {}
    for interval in (1, 4):
        sim = CountingSimulation(cfg, small_cluster(), stream_interval=interval)
        out = sim.run(items, times)
        assert all(r.success for r in out.records)
        assert [r.num_output_tokens for r in out.records] == [it.output_len for it in items]
        assert sim.finished == {r.request_id: 1 for r in out.records}
        budgets = {w.worker_id: w.device.kv_budget_bytes for w in sim.workers}
        assert all(b["measured_peak_bytes"] <= budgets[b["worker_id"]] for b in out.batches)
        assert sim.core.num_preempted == 0
        counts[interval] = sum(len(r.chunk_times_s) for r in out.records)
    assert counts[4] < counts[1] / 2  # the client got its tokens in fewer deltas


def test_tight_memory_exercises_parking_offload_and_preemption() -> None:
    items, times = load(150, seed=3)
    cfg = SchedulerConfig(max_gen_len=256, slice_len=16, kv_mode="keep")
    keep = Simulation(cfg, small_cluster()).run(items, times)
    assert sum(b["reused_kv_tokens"] for b in keep.batches) > 0  # parked slices adopted
    cfg = SchedulerConfig(policy="ils", ils_admission="optimistic", max_gen_len=256)
    sim = Simulation(cfg, small_cluster())
    sim.run(items, times)
    assert sim.core.num_preempted > 0


def test_the_same_seed_gives_the_same_run_and_noise_changes_it() -> None:
    items, times = load(120, seed=5)
    cfg = replace(POLICIES["scls"], max_gen_len=256, slice_len=32)

    def run(seed: int) -> list[tuple]:
        out = Simulation(cfg, small_cluster(), noise=0.2, seed=seed).run(items, times)
        return [(r.first_token_s, r.finished_s, tuple(r.chunk_times_s)) for r in out.records]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_ten_thousand_requests_on_eight_instances() -> None:
    rng = random.Random(11)
    n = 10_000
    items = [SimItem(i, rng.randint(16, 256), rng.randint(1, 48)) for i in range(n)]
    times = [i / 300.0 for i in range(n)]  # 300 requests/s
    sim = Simulation(SchedulerConfig(), [device_model("h100-80gb:llama-2-7b")] * 8, refine=False)
    out = sim.run(items, times)
    assert sum(r.success for r in out.records) == n
    assert sim.core.num_finished == n
    assert out.duration_s == pytest.approx(max(r.finished_s for r in out.records))
    assert out.duration_s < n / 300.0 + 30  # it keeps up with the arrivals


def test_a_slowdown_stretches_every_step() -> None:
    """SLS on one instance decides the same whatever the step times: twice as slow steps give
    exactly twice the simulated time."""
    items, _ = load(40, seed=9)
    dev = device_model("a100-80gb:llama-2-7b")
    cfg = SchedulerConfig(policy="sls", max_gen_len=256)
    fast = Simulation(cfg, [dev], refine=False).run(items, [0.0] * len(items))
    slow = Simulation(cfg, [replace(dev, slowdown=2.0)], refine=False).run(
        items, [0.0] * len(items)
    )
    assert slow.duration_s == pytest.approx(2 * fast.duration_s, rel=1e-9)


@pytest.mark.parametrize("name", ["scls", "scls:strict"])
def test_handoffs_move_kv_between_instances_and_lose_nothing(name: str) -> None:
    """Three instances, one three times slower: auto mode hands parked KV off to the others."""
    items, times = load(150, seed=3)
    a100 = device_model("a100-80gb:llama-3-8b", kv_budget_bytes=GIB // 4)
    devices = [a100, replace(a100, slowdown=3.0), a100]
    cfg = replace(POLICIES[name], max_gen_len=256, slice_len=16)
    sim = CountingSimulation(cfg, devices)
    out = sim.run(items, times)
    assert sum(b["handoff_tokens"] for b in out.batches) > 0
    assert all(r.success for r in out.records)
    assert sim.finished == {r.request_id: 1 for r in out.records}
    generated = sum(b["generated_tokens"] for b in out.batches)
    assert generated == sum(r.num_output_tokens for r in out.records)


def test_requests_no_policy_places_end_the_run_as_stalled() -> None:
    """SLS books prompt + L + 32 tokens a row: a 600-token prompt asking for 10 fits the
    broker's admission check (748 tokens) but never an SLS batch (600 + 256 + 32 > 780), so it
    waits with nothing running."""
    dev = device_model("h100-80gb:llama-3-8b", kv_budget_bytes=780 * 131_072)
    cfg = SchedulerConfig(policy="sls", max_gen_len=256)
    items = [SimItem(0, 20, 10), SimItem(1, 600, 10)]
    out = Simulation(cfg, [dev]).run(items, [0.0, 0.0])
    assert [r.finish_reason for r in out.records] == ["length", "stalled"]
    assert out.stall is not None and out.cut_off_s == out.stall["detected_s"] >= 60.0
