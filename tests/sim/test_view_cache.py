"""The broker keeps each worker's view of its running requests between rounds, and the
continuous policy what it derives from that view: under every policy, the cached view the
policy gets is always the one a fresh rebuild gives, and the plans are a fresh policy's."""

from __future__ import annotations

import pytest

from engine.broker.core import BrokerCore
from engine.broker.views import running_view
from engine.scheduler.continuous import ContinuousSCLSPolicy
from engine.scheduler.factory import make_policy
from engine.sim.cluster import Simulation
from tests.sim.test_sim_runs import POLICIES, load, small_cluster


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_cached_running_view_is_never_stale(name: str, monkeypatch) -> None:
    checked = []
    original = BrokerCore._worker_view

    def checking(core: BrokerCore, worker):
        view = original(core, worker)
        assert view.running == running_view(worker, core.requests)
        checked.append(len(view.running))
        return view

    monkeypatch.setattr(BrokerCore, "_worker_view", checking)
    items, times = load(150, seed=3, hidden=512 if name.startswith("scls") else None)
    sim = Simulation(POLICIES[name], small_cluster(), noise=0.1, seed=1)
    out = sim.run(items, times)
    assert all(r.finished_s is not None for r in out.records)
    assert sum(checked) > 0  # views with running requests were compared


@pytest.mark.parametrize("name", ["scls", "scls:keep", "scls:recompute"])
def test_the_continuous_policy_plans_alike_with_its_kept_state(name: str, monkeypatch) -> None:
    """The continuous policy keeps per worker, between rounds, what its running set holds and
    which rows near their slice's end: each round, a fresh policy (nothing kept) given the same
    views plans exactly the same dispatches."""
    cfg = POLICIES[name]
    compared = []
    original = ContinuousSCLSPolicy.schedule

    def checking(policy, waiting, workers, now):
        plan = original(policy, waiting, workers, now)
        assert plan == original(make_policy(cfg), waiting, workers, now)
        compared.append(len(plan))
        return plan

    monkeypatch.setattr(ContinuousSCLSPolicy, "schedule", checking)
    items, times = load(150, seed=3, hidden=512)
    sim = Simulation(cfg, small_cluster(), noise=0.1, seed=1)
    out = sim.run(items, times)
    assert all(r.finished_s is not None for r in out.records)
    assert sum(compared) > 0  # rounds that dispatched or renewed were compared
