"""The dashboard across a broker restart (real processes, tiny model): the stats stream stops
when the broker process is killed, the dashboard says so and keeps reconnecting (with backoff),
and when a broker is started again on the same ports it shows the new one, and says it did."""

from __future__ import annotations

import asyncio

import pytest
from broker_procs import BrokerProcs
from tui_stub import rendered_text, wait_for

from tui.app import DashboardApp
from tui.source import SubscriberSource
from tui.widgets.header import LINK_LIVE, LINK_STALE
from tui.widgets.workers import WorkerPanel

pytestmark = pytest.mark.timeout(180)


async def test_dashboard_follows_a_restarted_broker(tiny_model_dir, tmp_path) -> None:
    procs = BrokerProcs(tiny_model_dir, tmp_path)
    try:
        await asyncio.to_thread(procs.start_broker)
        procs.start_worker()
        app = DashboardApp(SubscriberSource(procs.stats_addr), address=procs.stats_addr)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_for(pilot, lambda: len(app.query(WorkerPanel)) == 1, "the worker", 60)
            assert app.link == LINK_LIVE
            await asyncio.to_thread(procs.kill_broker)
            await wait_for(pilot, lambda: app.link == LINK_STALE, "the stream to stop", 10)
            await asyncio.to_thread(procs.start_broker)
            await wait_for(pilot, lambda: app.link == LINK_LIVE, "the new broker's stats", 20)
            await wait_for(pilot, lambda: len(app.query(WorkerPanel)) == 1, "the worker back", 30)
            log = rendered_text(app.log_pane)
            assert "stats stream stopped" in log and "reconnecting" in log
            assert "stats stream resumed" in log and "the broker restarted" in log
    finally:
        procs.close()
