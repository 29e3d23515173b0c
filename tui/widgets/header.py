"""The status header: link state, engine configuration, request counts, throughput, latency."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from engine.protocol import StatsSnapshot

from .fmt import fmt_rate, fmt_s

#: Link states, set by the app: no snapshot yet, snapshots arriving, snapshots stopped.
LINK_DISCONNECTED = "disconnected"
LINK_LIVE = "live"
LINK_STALE = "stale"

_LINK_STYLE = {
    LINK_DISCONNECTED: ("○ disconnected", "bold red"),
    LINK_LIVE: ("● live", "bold green"),
    LINK_STALE: ("◌ stale", "bold yellow"),
}


class StatusHeader(Widget):
    """Three lines at the top; every field is a reactive, so a change only repaints this widget."""

    #: always_update: skips comparing two whole snapshots (thousands of requests) for equality.
    snapshot: reactive[StatsSnapshot | None] = reactive(None, always_update=True)
    link: reactive[str] = reactive(LINK_DISCONNECTED)
    data_age_s: reactive[float | None] = reactive(None)  # seconds since the last snapshot
    paused: reactive[bool] = reactive(False)

    def __init__(self, address: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.address = address

    def watch_link(self, link: str) -> None:
        self.set_class(link == LINK_STALE, "-stale")
        self.set_class(link == LINK_DISCONNECTED, "-disconnected")

    def render(self) -> Text:
        return Text("\n").join([self._link_line(), *self._stats_lines()])

    def _link_line(self) -> Text:
        label, style = _LINK_STYLE.get(self.link, (self.link, "bold"))
        line = Text.assemble((label, style))
        if self.link == LINK_STALE and self.data_age_s is not None:
            line.append(f": no data for {fmt_s(self.data_age_s)}", style)
        if self.link == LINK_DISCONNECTED:
            line.append(
                f"  waiting for a broker's stats at {self.address or '?'} (its client port + 2, "
                "e.g. tcp://127.0.0.1:5557; --connect takes either)",
                "dim",
            )
        elif self.address:
            line.append(f"  {self.address}", "dim")
        if self.paused:
            line.append("   ")
            line.append(" PAUSED ", "bold reverse")
        snap = self.snapshot
        if snap is not None:
            line.append(f"   up {fmt_s(snap.uptime_s)}", "dim")
        return line

    def _stats_lines(self) -> list[Text]:
        snap = self.snapshot
        if snap is None:
            return [Text("no data yet", "dim"), Text("")]
        config = Text.assemble(
            ("policy ", "dim"),
            (snap.policy, "bold"),
            ("  slice ", "dim"),
            str(snap.slice_len),
            ("  max gen ", "dim"),
            str(snap.max_gen_len),
            ("  kv ", "dim"),
            snap.kv_mode,
            ("  workers ", "dim"),
            str(snap.num_workers),
            ("   │   ", "dim"),
            ("waiting ", "dim"),
            str(snap.num_waiting),
            ("  running ", "dim"),
            str(snap.num_running),
            ("  finished ", "dim"),
            str(snap.num_finished),
            ("  failed ", "dim"),
            (str(snap.num_failed), "bold red" if snap.num_failed else ""),
        )
        perf = Text.assemble(
            ("now ", "dim"),
            (fmt_rate(snap.request_throughput), "bold"),
            " req/s  ",
            (fmt_rate(snap.token_throughput), "bold"),
            " tok/s",
            ("   │   ", "dim"),
            ("TTFT p50 ", "dim"),
            fmt_s(snap.ttft_p50_s),
            ("  p99 ", "dim"),
            fmt_s(snap.ttft_p99_s),
            ("   │   ", "dim"),
            ("e2e p50 ", "dim"),
            fmt_s(snap.e2e_p50_s),
            ("  p99 ", "dim"),
            fmt_s(snap.e2e_p99_s),
        )
        return [config, perf]
