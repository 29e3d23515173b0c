"""The dashboard app: wires a StatsSource to the widgets. ``run_dashboard`` is the CLI's entry.

Wiring only: the panels render themselves (tui/widgets/), the engine is reached through
tui/source.py. Snapshots arrive in a worker task and reach the UI as messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import var
from textual.widgets import Footer

from engine.protocol import LogEvent, ProtocolError, StatsSnapshot

from .source import StatsSource, StatsSourceUnavailable, SubscriberSource
from .widgets.fmt import fmt_s
from .widgets.header import LINK_DISCONNECTED, LINK_LIVE, LINK_STALE, StatusHeader
from .widgets.help import HelpScreen
from .widgets.log_pane import EventFilter, LogPane
from .widgets.requests import RequestsTable
from .widgets.workers import WorkersView

DEFAULT_STATS_ADDR = "tcp://127.0.0.1:5557"


class SnapshotReceived(Message):
    """A snapshot came from the source (posted by the receiving worker)."""

    def __init__(self, snapshot: StatsSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class SourceProblem(Message):
    """The source failed: ``fatal`` ends the dashboard, otherwise it is only logged."""

    def __init__(self, text: str, fatal: bool) -> None:
        super().__init__()
        self.text = text
        self.fatal = fatal


class DashboardApp(App[None]):
    """Live view of one broker. ``clock`` (monotonic seconds) is injectable for tests."""

    CSS_PATH = "app.tcss"
    TITLE = "SCLS dashboard"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        # Textual's default ctrl+c only says how to quit; here it quits as q does (exit 0).
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("p", "toggle_pause", "Pause"),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    paused: var[bool] = var(False, init=False)
    link: var[str] = var(LINK_DISCONNECTED, init=False)

    def __init__(
        self,
        source: StatsSource,
        *,
        address: str = "",
        stale_after_s: float = 2.0,
        recv_timeout_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.source = source
        self.address = address
        self.stale_after_s = stale_after_s
        self.recv_timeout_s = recv_timeout_s
        self.clock = clock
        self.latest: StatsSnapshot | None = None  # last received (shown unless paused)
        self.shown: StatsSnapshot | None = None  # last applied to the widgets
        self.last_received_at: float | None = None
        self._events = EventFilter()
        self._unshown_events: list[LogEvent] = []
        # Kept as attributes: while the help screen is up, app queries see that screen instead.
        self.header = StatusHeader(address, id="header")
        self.workers_view = WorkersView(id="workers")
        self.requests_table = RequestsTable(id="requests")
        self.log_pane = LogPane(id="log")
        self.body = Horizontal(id="body")

    def compose(self) -> ComposeResult:
        yield self.header
        with self.body:
            yield self.workers_view
            with Vertical(id="right"):
                yield self.requests_table
                yield self.log_pane
        yield Footer()

    def on_mount(self) -> None:
        self.workers_view.border_title = "workers"
        self.requests_table.border_title = "requests"
        self.log_pane.border_title = "log"
        self.set_interval(0.25, self.check_link)
        self.receive_snapshots()

    def on_unmount(self) -> None:
        # Workers are cancelled at exit but not awaited: close the socket here, deterministically.
        self.workers.cancel_group(self, "stats")
        self.source.close()

    @work(exclusive=True, group="stats")
    async def receive_snapshots(self) -> None:
        """Pull snapshots for the app's lifetime; the source is closed when the app exits."""
        failing = False
        try:
            while True:
                try:
                    snapshot = await self.source.recv(self.recv_timeout_s)
                except StatsSourceUnavailable as exc:
                    self.post_message(SourceProblem(str(exc), fatal=True))
                    return
                except ProtocolError as exc:
                    if not failing:  # one line per run of bad frames, not one per frame
                        self.post_message(SourceProblem(f"bad stats frame: {exc}", fatal=False))
                    failing = True
                    continue
                failing = False
                if snapshot is not None:
                    self.post_message(SnapshotReceived(snapshot))
        finally:
            self.source.close()

    def on_snapshot_received(self, message: SnapshotReceived) -> None:
        snapshot = message.snapshot
        found_at = getattr(self.source, "addr", None)  # a client address leads to the stats
        if found_at and self.address and found_at != self.header.address:
            self.log_pane.note(f"the broker's stats are at {found_at} (asked {self.address})")
            self.header.address = found_at
        if self.latest is not None and snapshot.uptime_s < self.latest.uptime_s:
            self.log_pane.note(
                f"the broker restarted {fmt_s(snapshot.uptime_s)} ago: showing the new one",
                "yellow",
            )
        self.latest = snapshot
        self.last_received_at = self.clock()
        self._unshown_events += self._events.fresh(snapshot.events, snapshot.uptime_s)
        self.check_link()
        if not self.paused:
            self._show(snapshot)

    def on_source_problem(self, message: SourceProblem) -> None:
        if message.fatal:
            self.exit(return_code=1, message=message.text)
        else:
            self.log_pane.note(message.text, "yellow")

    def _show(self, snapshot: StatsSnapshot) -> None:
        self.shown = snapshot
        self.header.snapshot = snapshot
        self.workers_view.sync(snapshot.workers)
        self.requests_table.sync(snapshot.requests)
        self.log_pane.add(self._unshown_events)
        self._unshown_events = []

    def check_link(self) -> None:
        """Derive the link state from the time since the last snapshot (timer and on receipt)."""
        if self.last_received_at is None:
            return
        age_s = self.clock() - self.last_received_at
        stale = age_s > self.stale_after_s
        self.header.data_age_s = age_s if stale else None
        self.link = LINK_STALE if stale else LINK_LIVE

    def watch_link(self, old: str, new: str) -> None:
        self.header.link = new
        self.body.set_class(new == LINK_STALE, "-stale")
        if new == LINK_STALE:
            self.log_pane.note(
                f"stats stream stopped (no data for {self.stale_after_s:g} s): reconnecting "
                "until the broker is back"
            )
        elif old == LINK_STALE:
            self.log_pane.note("stats stream resumed")

    def watch_paused(self, paused: bool) -> None:
        self.header.paused = paused
        if not paused and self.latest is not None and self.latest is not self.shown:
            self._show(self.latest)

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def run_dashboard(connect: str = DEFAULT_STATS_ADDR, curve=None) -> None:
    """Show the dashboard of the broker publishing stats at ``connect`` until the user quits.

    Needs a terminal (the CLI checks). Raises SystemExit with the app's return code when the
    stats source cannot be opened (the reason is printed when the app closes).
    """
    app = DashboardApp(SubscriberSource(connect, curve), address=connect)
    app.run()
    if app.return_code:
        raise SystemExit(app.return_code)
