"""Worker panels: one per live worker, mounted and removed as workers join and leave."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Sparkline, Static

from engine.protocol import BatchInfo, WorkerStats

from .fmt import fmt_bytes, fmt_percent, fmt_rate, fmt_s

#: Batches listed per worker queue before "+N more".
MAX_QUEUED_SHOWN = 4


class KvBar(Widget):
    """KV cache memory: used (solid), up to the predicted peak (shaded), against the budget."""

    used_bytes: reactive[int] = reactive(0)
    parked_bytes: reactive[int] = reactive(0)
    peak_bytes: reactive[int] = reactive(0)
    budget_bytes: reactive[int] = reactive(0)

    def render(self) -> Text:
        width = max(self.size.width, 10)
        # Scale to the largest figure so that a peak above the budget shows as overflow.
        scale = max(self.budget_bytes, self.peak_bytes, self.used_bytes, 1)
        used = round(width * self.used_bytes / scale)
        peak = max(used, round(width * self.peak_bytes / scale))
        budget = round(width * self.budget_bytes / scale)
        over = self.peak_bytes > self.budget_bytes > 0
        bar = Text()
        bar.append("█" * used, "red" if self.used_bytes > self.budget_bytes else "green")
        bar.append("▒" * (peak - used), "red" if over else "yellow")
        bar.append("░" * max(budget - peak, 0), "grey50")
        bar.append(" " * (width - bar.cell_len))
        fraction = self.used_bytes / self.budget_bytes if self.budget_bytes else 0.0
        numbers = Text.assemble(
            ("KV ", "bold"),
            fmt_bytes(self.used_bytes),
            (" used · ", "dim"),
            fmt_bytes(self.peak_bytes),
            (" peak · ", "dim"),
            fmt_bytes(self.budget_bytes),
            (" budget ", "dim"),
            f"({fraction:.0%})",
        )
        if self.parked_bytes:
            numbers.append(f" · {fmt_bytes(self.parked_bytes)} parked", "dim")
        return Text("\n").join([bar, numbers])


def _running_line(batch: BatchInfo) -> Text:
    return Text.assemble(
        ("run ", "bold"),
        f"#{batch.batch_id} ",
        ("step ", "dim"),
        f"{batch.step}/{batch.max_steps}",
        (" · ", "dim"),
        f"{batch.num_requests} req",
        (" · ", "dim"),
        f"{batch.num_finished} finished early",
    )


def _queue_line(queued: list[BatchInfo]) -> Text:
    line = Text.assemble(("queue ", "bold"), str(len(queued)))
    for batch in queued[:MAX_QUEUED_SHOWN]:
        line.append("  ")
        line.append(f"{batch.num_requests}×{batch.padded_len}")
        line.append(f" {fmt_s(batch.predicted_s)}", "dim")
    if len(queued) > MAX_QUEUED_SHOWN:
        line.append(f"  +{len(queued) - MAX_QUEUED_SHOWN} more", "dim")
    return line


def _memory_line(stats: WorkerStats) -> Text:
    if stats.mem_used_bytes is None and stats.mem_total_bytes is None:
        mem = "n/a"
    else:
        mem = f"{fmt_bytes(stats.mem_used_bytes)} / {fmt_bytes(stats.mem_total_bytes)}"
    return Text.assemble(
        ("mem ", "bold"), mem, ("  util ", "bold"), fmt_percent(stats.util_percent)
    )


class WorkerPanel(Vertical):
    """One worker: device, running batch, queue, KV bar, memory, tokens/s sparkline."""

    #: always_update: each snapshot adds a sparkline point even when nothing else changed.
    stats: reactive[WorkerStats | None] = reactive(None, always_update=True, repaint=False)

    def __init__(self, worker_id: str, history_len: int = 60) -> None:
        super().__init__(classes="worker-panel")
        self.worker_id = worker_id
        self.border_title = worker_id
        self.tps_history: deque[float] = deque(maxlen=history_len)
        # Held as attributes, not queried: a snapshot may arrive before the children are mounted.
        self.running_line = Static(classes="running")
        self.queue_line = Static(classes="queue")
        self.kv_bar = KvBar()
        self.memory_line = Static(classes="memory")
        self.tps_line = Static(classes="tps")
        self.sparkline = Sparkline([], classes="tps-spark")

    def compose(self) -> ComposeResult:
        yield self.running_line
        yield self.queue_line
        yield self.kv_bar
        yield self.memory_line
        with Horizontal(classes="tps-row"):
            yield self.tps_line
            yield self.sparkline

    def on_mount(self) -> None:
        if self.stats is not None:
            self._show(self.stats)

    def watch_stats(self, stats: WorkerStats | None) -> None:
        if stats is None:
            return
        self.tps_history.append(stats.tokens_per_s)
        if self.is_mounted:
            self._show(stats)

    def _show(self, stats: WorkerStats) -> None:
        self.border_subtitle = f"{stats.device} · {stats.state}"
        self.set_class(stats.state == "busy", "-busy")
        running = [_running_line(b) for b in stats.running] or [Text("idle", "dim")]
        self.running_line.update(Text("\n").join(running))
        self.queue_line.update(_queue_line(stats.queued))
        bar = self.kv_bar
        bar.used_bytes = stats.kv_used_bytes
        bar.parked_bytes = stats.kv_parked_bytes
        bar.peak_bytes = stats.kv_predicted_peak_bytes
        bar.budget_bytes = stats.kv_budget_bytes
        self.memory_line.update(_memory_line(stats))
        self.tps_line.update(f"{fmt_rate(stats.tokens_per_s)} tok/s")
        self.sparkline.data = list(self.tps_history)


class WorkersView(VerticalScroll):
    """The worker panels, keyed by worker id; lost workers' panels go (the log says why)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.panels: dict[str, WorkerPanel] = {}

    def compose(self) -> ComposeResult:
        yield Static("no workers", classes="placeholder")

    def sync(self, workers: list[WorkerStats]) -> None:
        """Show exactly the live workers of this snapshot, updating existing panels in place."""
        live = {w.worker_id: w for w in workers if w.state != "lost"}
        for worker_id in [w for w in self.panels if w not in live]:
            self.panels.pop(worker_id).remove()
        for worker_id, stats in live.items():
            panel = self.panels.get(worker_id)
            if panel is None:
                panel = self.panels[worker_id] = WorkerPanel(worker_id)
                self.mount(panel)
            panel.stats = stats
        self.query_one(".placeholder", Static).display = not self.panels
