"""The log pane: broker events (errors, workers joining and lost), each shown once."""

from __future__ import annotations

from collections import OrderedDict

from rich.text import Text
from textual.widgets import RichLog

from engine.protocol import LogEvent

from .fmt import fmt_s

_LEVEL_STYLE = {"info": "cyan", "warning": "yellow", "error": "bold red"}


class EventFilter:
    """Passes each LogEvent once although every snapshot repeats the broker's recent events.

    LogEvent has no sequence number, so an event is known by (at_s, level, message); at_s is
    the broker's uptime, so uptime going backwards means a restarted broker and a fresh start.
    """

    def __init__(self, max_remembered: int = 4096) -> None:
        self.max_remembered = max_remembered
        self._seen: OrderedDict[tuple[float, str, str], None] = OrderedDict()
        self._uptime_s = -1.0

    def fresh(self, events: list[LogEvent], uptime_s: float) -> list[LogEvent]:
        """The events of one snapshot that were not passed before, in order."""
        if uptime_s < self._uptime_s:
            self._seen.clear()
        self._uptime_s = uptime_s
        new = []
        for event in events:
            key = (event.at_s, event.level, event.message)
            if key not in self._seen:
                self._seen[key] = None
                new.append(event)
        while len(self._seen) > self.max_remembered:
            self._seen.popitem(last=False)
        return new


def format_event(event: LogEvent) -> Text:
    return Text.assemble(
        (f"{fmt_s(event.at_s):>8} ", "dim"),
        (f"{event.level.upper():<7} ", _LEVEL_STYLE.get(event.level, "")),
        event.message,
    )


class LogPane(RichLog):
    """A bounded, scrolling log; ``add`` writes events, ``note`` the dashboard's own lines."""

    def __init__(self, max_lines: int = 2000, **kwargs) -> None:
        super().__init__(max_lines=max_lines, wrap=True, markup=False, **kwargs)

    def add(self, events: list[LogEvent]) -> None:
        for event in events:
            self.write(format_event(event))

    def note(self, message: str, style: str = "dim") -> None:
        self.write(Text(f"{'':>8} {'TUI':<7} {message}", style))
