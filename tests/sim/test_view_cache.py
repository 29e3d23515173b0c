"""The broker keeps each worker's view of its running requests between rounds: under every
policy, the cached view the policy gets is always the one a fresh rebuild gives."""

from __future__ import annotations

import pytest

from engine.broker.core import BrokerCore
from engine.broker.views import running_view
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
