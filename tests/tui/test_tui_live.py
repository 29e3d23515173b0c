"""The dashboard against a real broker and two real workers (tiny model): requests finish on it."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import local_engine
from tui_stub import rendered_text, wait_for

from engine.client import AsyncClient
from tui.app import DashboardApp
from tui.source import SubscriberSource
from tui.widgets.workers import WorkerPanel

pytestmark = pytest.mark.timeout(180)


async def test_dashboard_shows_workers_and_finished_requests(tiny_model_dir) -> None:
    with local_engine(tiny_model_dir, num_workers=2, policy="scls", slice_len=4) as engine:
        app = DashboardApp(SubscriberSource(engine.stats_addr), address=engine.stats_addr)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_for(pilot, lambda: len(app.query(WorkerPanel)) == 2, "two worker panels", 30)
            async with AsyncClient(engine.client_addr, timeout_s=60) as client:
                results = await asyncio.gather(
                    *(
                        client.generate(
                            prompt_ids=[3 + i, 4, 5],
                            max_tokens=9,
                            ignore_eos=True,
                            request_id=f"live-{i}",
                        )
                        for i in range(6)
                    )
                )
            assert all(len(r.token_ids) == 9 for r in results)
            await wait_for(
                pilot,
                lambda: rendered_text(app.requests_table).count("finished") >= 6,
                "6 finished rows",
                30,
            )
            table = rendered_text(app.requests_table)
            assert "live-0" in table and "live-5" in table
            assert "live" in rendered_text(app.header)
