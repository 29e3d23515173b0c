"""Pilot tests of the whole dashboard against a stub stats source (no broker, no sockets)."""

from __future__ import annotations

import pytest
from textual.widgets import Sparkline
from tui_stub import (
    GIB,
    FakeClock,
    StubSource,
    batch,
    event,
    rendered_text,
    request,
    snapshot,
    wait_for,
    worker,
)

from tui.app import DashboardApp
from tui.source import StatsSourceUnavailable
from tui.widgets.help import HelpScreen
from tui.widgets.workers import KvBar, WorkerPanel

SIZE = (150, 45)


@pytest.fixture
def source() -> StubSource:
    return StubSource()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(source: StubSource, clock: FakeClock) -> DashboardApp:
    return DashboardApp(source, address="tcp://127.0.0.1:5557", clock=clock)


def panels(app: DashboardApp) -> dict[str, WorkerPanel]:
    return {p.worker_id: p for p in app.query(WorkerPanel)}


async def show(pilot, app: DashboardApp, source: StubSource, snap) -> None:
    """Push one snapshot and wait until the widgets show it."""
    source.push(snap)
    await wait_for(pilot, lambda: app.shown is snap, "the snapshot to be shown")
    await pilot.pause()


async def test_disconnected_without_data(app: DashboardApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        header = rendered_text(app.header)
        assert "disconnected" in header
        assert "tcp://127.0.0.1:5557" in header
        assert "no workers" in rendered_text(app.workers_view)
        assert app.requests_table.row_count == 0


async def test_header_shows_the_snapshot(app: DashboardApp, source: StubSource) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await show(pilot, app, source, snapshot(num_workers=2, num_failed=1))
        header = rendered_text(app.header)
        assert "live" in header and "disconnected" not in header
        for text in (
            "policy scls",
            "slice 64",
            "max gen 1024",
            "kv keep",
            "workers 2",
            "waiting 3",
            "running 8",
            "finished 120",
            "failed 1",
            "3.20 req/s",
            "812 tok/s",
            "TTFT p50 120ms  p99 450ms",
            "e2e p50 2.10s  p99 5.80s",
        ):
            assert text in header, text


async def test_worker_panels_come_and_go(app: DashboardApp, source: StubSource) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await show(
            pilot, app, source, snapshot(workers=[worker("w0"), worker("w1", device="cuda:1")])
        )
        await wait_for(pilot, lambda: len(panels(app)) == 2, "two panels")
        assert "cuda:1" in rendered_text(panels(app)["w1"])
        assert "no workers" not in rendered_text(app.workers_view)

        await show(pilot, app, source, snapshot(workers=[worker("w1", device="cuda:1")]))
        await wait_for(pilot, lambda: set(panels(app)) == {"w1"}, "w0's panel to go")

        lost = snapshot(workers=[worker("w1", state="lost"), worker("w2")])
        await show(pilot, app, source, lost)
        await wait_for(pilot, lambda: set(panels(app)) == {"w2"}, "lost w1 to go, w2 to come")

        await show(pilot, app, source, snapshot(workers=[]))
        await wait_for(pilot, lambda: not panels(app), "all panels to go")
        assert "no workers" in rendered_text(app.workers_view)


async def test_numbers_and_bars_update(app: DashboardApp, source: StubSource) -> None:
    first = worker(
        running=[batch(12, step=3, num_finished=0)],
        queued=[batch(13, num_requests=6, padded_len=200, predicted_s=1.1)],
        kv_used_bytes=1 * GIB,
        tokens_per_s=100.0,
    )
    second = worker(
        running=[batch(12, step=40, num_finished=2)],
        queued=[],
        kv_used_bytes=3 * GIB,
        mem_used_bytes=5 * GIB,
        mem_total_bytes=16 * GIB,
        util_percent=73.0,
        tokens_per_s=250.0,
    )
    async with app.run_test(size=SIZE) as pilot:
        await show(pilot, app, source, snapshot(workers=[first]))
        panel = panels(app)["w0"]
        text = rendered_text(panel)
        assert "step 3/64" in text and "8 req" in text and "0 finished early" in text
        assert "queue 1" in text and "6×200 1.10s" in text
        assert "1.0 GiB used" in text and "2.0 GiB peak" in text and "4.0 GiB budget" in text
        assert "mem n/a" in text and "util n/a" in text
        bar_before = rendered_text(panel.query_one(KvBar)).count("█")

        await show(pilot, app, source, snapshot(workers=[second]))
        assert panels(app)["w0"] is panel  # updated in place, not replaced
        text = rendered_text(panel)
        assert "step 40/64" in text and "2 finished early" in text
        assert "queue 0" in text
        assert "3.0 GiB used" in text
        assert "mem 5.0 GiB / 16.0 GiB" in text and "util 73%" in text
        assert "250 tok/s" in text
        assert rendered_text(panel.query_one(KvBar)).count("█") > bar_before
        assert list(panel.query_one(Sparkline).data) == [100.0, 250.0]


async def test_requests_update_in_place(app: DashboardApp, source: StubSource) -> None:
    table = app.requests_table
    async with app.run_test(size=SIZE) as pilot:
        first = [request("r2", state="waiting", worker_id=None, ttft_s=None), request("r1")]
        await show(pilot, app, source, snapshot(requests=first))
        assert table.row_count == 2
        row_keys = dict(table.rows)

        done = request("r1", state="finished", generated_tokens=64, num_slices=2, latency_s=2.5)
        await show(pilot, app, source, snapshot(requests=[request("r3"), first[0], done]))
        assert table.row_count == 3
        assert all(table.rows[key] is row for key, row in row_keys.items())  # rows kept
        assert [table.get_row_at(i)[0] for i in range(3)] == ["r3", "r2", "r1"]  # newest first
        assert str(table.get_cell("r1", "state")) == "finished"
        assert table.get_cell("r1", "generated") == 64
        assert table.get_cell("r1", "latency") == "2.50s"
        text = rendered_text(table)
        assert "finished" in text and "2.50s" in text

        await show(pilot, app, source, snapshot(requests=[request("r3")]))
        assert list(table.rows) == ["r3"]


async def test_log_shows_each_event_once(app: DashboardApp, source: StubSource) -> None:
    joined = event(1.0, "worker w0 joined")
    failed = event(2.5, "batch 7 failed on w0: out of memory", "error")
    async with app.run_test(size=SIZE) as pilot:
        await show(pilot, app, source, snapshot(events=[joined]))
        await show(pilot, app, source, snapshot(events=[joined, failed]))
        await show(pilot, app, source, snapshot(events=[joined, failed]))
        text = rendered_text(app.log_pane)
        assert text.count("worker w0 joined") == 1
        assert text.count("out of memory") == 1
        assert "ERROR" in text


async def test_pause_freezes_the_screen(app: DashboardApp, source: StubSource) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await show(pilot, app, source, snapshot(num_waiting=3))
        await pilot.press("p")
        assert "PAUSED" in rendered_text(app.header)

        later = snapshot(num_waiting=42, events=[event(3.0, "worker w9 joined")])
        source.push(later)
        await wait_for(pilot, lambda: app.latest is later, "the snapshot to arrive")
        await pilot.pause()
        assert "waiting 3" in rendered_text(app.header)
        assert "w9" not in rendered_text(app.log_pane)

        await pilot.press("p")
        await pilot.pause()
        header = rendered_text(app.header)
        assert "PAUSED" not in header and "waiting 42" in header
        assert "worker w9 joined" in rendered_text(app.log_pane)


async def test_help_and_quit(app: DashboardApp, source: StubSource) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        help_text = rendered_text(app.screen.query_one("#help-text"))
        assert "pause / resume updates" in help_text and "quit" in help_text
        await show(pilot, app, source, snapshot())  # updates go on behind the help screen
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), "help to close")
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, "the app to exit")
    assert source.closed


async def test_tab_moves_between_panels(app: DashboardApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        visited = []
        for _ in range(3):
            await pilot.press("tab")
            visited.append(app.focused.id if app.focused else None)
        assert set(visited) == {"workers", "requests", "log"}


async def test_stale_after_the_stream_stops(
    app: DashboardApp, source: StubSource, clock: FakeClock
) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await show(pilot, app, source, snapshot())
        assert "live" in rendered_text(app.header)

        clock.now += 3.0  # no snapshot for 3 s
        await wait_for(pilot, lambda: "stale" in rendered_text(app.header), "stale marking")
        assert "no data for 3.00s" in rendered_text(app.header)
        assert app.body.has_class("-stale")
        assert "stats stream stopped" in rendered_text(app.log_pane)

        await show(pilot, app, source, snapshot(num_waiting=7))
        header = rendered_text(app.header)
        assert "live" in header and "stale" not in header and "waiting 7" in header
        assert not app.body.has_class("-stale")


class _MissingClient:
    async def recv(self, timeout_s: float):
        raise StatsSourceUnavailable("engine.client.AsyncStatsSubscriber is not available")

    def close(self) -> None:
        pass


async def test_exits_when_the_source_cannot_open() -> None:
    app = DashboardApp(_MissingClient())
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: not app.is_running, "the app to exit")
    assert app.return_code == 1


async def test_ctrl_c_quits_as_q_does(app: DashboardApp, source: StubSource) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: not app.is_running, "the app to exit on ctrl+c")
    assert app.return_code == 0 and source.closed
