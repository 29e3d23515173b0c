"""The help overlay: what the keys do and what the panels show."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

HELP_TEXT = """\
[b]Keys[/b]
  q        quit (ctrl+c too)
  p        pause / resume updates (data keeps arriving; the screen freezes)
  tab      next panel (shift+tab: previous); arrows and page keys scroll it
  ?        this help (escape or ? closes it)

[b]Panels[/b]
  header   link state, policy, slice and generation lengths, KV mode, request counts,
           throughput now, TTFT and end-to-end p50/p99 over the broker's recent window
  workers  per worker: running batch (step i/S, size, finished early), queued batches
           (size × padded length, predicted time), KV bar (█ used, ▒ up to the predicted
           peak, ░ free budget), device memory and utilisation, tokens/s history
  requests the most recent requests, newest first
  log      broker events: errors, workers joining and lost

[b]Link[/b]
  disconnected: no snapshot yet (it connects by itself when the broker starts);
  stale: snapshots stopped for more than 2 s, the figures shown are old."""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static(HELP_TEXT, id="help-text")
