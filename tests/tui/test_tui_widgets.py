"""Widget logic on its own: number formats, event de-duplication, the requests table diff."""

from __future__ import annotations

from textual.app import App, ComposeResult
from tui_stub import event, request

from tui.widgets.fmt import fmt_bytes, fmt_percent, fmt_rate, fmt_s
from tui.widgets.log_pane import EventFilter
from tui.widgets.requests import RequestsTable


def test_formats() -> None:
    assert fmt_bytes(None) == "n/a"
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_bytes(3 * 1024**3) == "3.0 GiB"
    assert fmt_bytes(2048 * 1024**3) == "2048.0 GiB"
    assert fmt_s(None) == "—"
    assert fmt_s(0.1234) == "123ms"
    assert fmt_s(2.1) == "2.10s"
    assert fmt_s(185) == "3m05s"
    assert fmt_s(7300) == "2h01m"
    assert [fmt_rate(r) for r in (0.25, 12.34, 812.4, 12345)] == ["0.25", "12.3", "812", "12.3k"]
    assert fmt_percent(None) == "n/a" and fmt_percent(73.4) == "73%"


def test_event_filter_passes_each_event_once() -> None:
    events = EventFilter()
    a, b, c = event(1.0, "w0 joined"), event(2.0, "w1 joined"), event(3.0, "w1 lost", "error")
    assert events.fresh([a, b], uptime_s=5) == [a, b]
    assert events.fresh([a, b, c], uptime_s=6) == [c]
    assert events.fresh([b, c], uptime_s=7) == []
    # Same message at another time is another event.
    again = event(9.0, "w0 joined")
    assert events.fresh([c, again], uptime_s=10) == [again]


def test_event_filter_starts_afresh_after_a_broker_restart() -> None:
    events = EventFilter()
    a = event(1.0, "w0 joined")
    assert events.fresh([a], uptime_s=100) == [a]
    assert events.fresh([a], uptime_s=2) == [a]  # uptime went back: a new broker


def test_event_filter_memory_is_bounded() -> None:
    events = EventFilter(max_remembered=10)
    for i in range(100):
        events.fresh([event(float(i), f"e{i}")], uptime_s=i)
    assert len(events._seen) == 10


class TableApp(App[None]):
    def __init__(self, max_rows: int) -> None:
        super().__init__()
        self.table = RequestsTable(max_rows=max_rows)

    def compose(self) -> ComposeResult:
        yield self.table


async def test_requests_table_changes_only_what_changed() -> None:
    app = TableApp(max_rows=1000)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        table = app.table
        many = [request(f"r{i}", generated_tokens=i) for i in range(3000, 0, -1)]  # newest first
        assert table.sync(many) == (1000, 0, 0)
        assert table.row_count == 1000
        assert table.get_row_at(0)[0] == "r3000" and table.get_row_at(999)[0] == "r2001"

        # Ten requests finish: two cells each (state, latency); nothing added or removed.
        changed = list(many)
        for i in range(10):
            changed[i] = request(
                changed[i].request_id,
                state="finished",
                latency_s=1.0,
                generated_tokens=changed[i].generated_tokens,
            )
        assert table.sync(changed) == (0, 20, 0)
        assert table.sync(changed) == (0, 0, 0)

        # Five new requests push the five oldest out.
        newer = [request(f"n{i}") for i in range(5)] + changed
        assert table.sync(newer) == (5, 0, 5)
        assert table.row_count == 1000 and table.get_row_at(0)[0] == "n0"

        # A whole new window (a broker restart) is a rebuild, not 1000 single removals.
        fresh = [request(f"x{i}") for i in range(1000)]
        assert table.sync(fresh) == (1000, 0, 1000)
        assert table.row_count == 1000 and table.get_row_at(0)[0] == "x0"
