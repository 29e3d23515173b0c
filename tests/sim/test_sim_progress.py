"""A long simulation says how far it is: each request that ends advances the progress line,
which names the simulated seconds; on a terminal the bar is redrawn at most every 0.1 s."""

from __future__ import annotations

import io

from engine.bench.progress import Progress
from engine.config import SchedulerConfig
from engine.sim.cluster import Simulation
from tests.sim.test_sim_runs import load, small_cluster


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_every_request_that_ends_advances_the_progress_line() -> None:
    items, times = load(120, seed=5)
    sim = Simulation(SchedulerConfig(), small_cluster())
    stream = io.StringIO()
    progress = Progress("simulate scls", len(items), stream, lambda: f"{sim.clock:.1f} simulated s")
    out = sim.run(items, times, progress=progress)
    assert progress.num_done == len(items) == sum(r.finished_s is not None for r in out.records)
    assert progress.num_failed == sum(not r.success for r in out.records)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("simulate scls: 0/120 requests")
    assert "120/120 requests" in lines[-1]
    assert lines[-1].endswith(f"| {out.duration_s:.1f} simulated s")


def test_a_terminal_bar_is_not_redrawn_for_every_request() -> None:
    stream = _Terminal()
    progress = Progress("simulate scls", 10_000, stream)
    progress.start()
    for _ in range(10_000):
        progress.advance()
    progress.finish()
    draws = stream.getvalue().split("\r")[1:]
    assert len(draws) < 100  # a loop this fast takes well under 10 s: one draw per 0.1 s
    assert "10000/10000 requests" in draws[-1] and stream.getvalue().endswith("\n")
