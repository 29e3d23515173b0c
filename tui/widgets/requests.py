"""The requests table: the broker's most recent requests, updated cell by cell, keyed by id."""

from __future__ import annotations

from typing import NamedTuple

from rich.text import Text
from textual.widgets import DataTable

from engine.protocol import RequestInfo

from .fmt import NONE, fmt_s

#: (column key, label, width); None: sized to the widest id when rows are added.
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("id", "id", None),
    ("state", "state", 9),
    ("prompt", "prompt", 7),
    ("generated", "gen", 6),
    ("slices", "slices", 6),
    ("worker", "worker", 10),
    ("ttft", "TTFT", 7),
    ("latency", "latency", 8),
)

_STATE_STYLE = {
    "waiting": "yellow",
    "running": "bold cyan",
    "finished": "green",
    "cancelled": "grey50",
    "failed": "bold red",
}

#: Beyond this many removals in one snapshot, rebuilding is cheaper than removing row by row
#: (DataTable.remove_row re-indexes every row).
_REBUILD_AT_REMOVALS = 64


def _cells(info: RequestInfo) -> tuple:
    """The displayed cells of one request, in COLUMNS order."""
    return (
        info.request_id,
        Text(info.state, _STATE_STYLE.get(info.state, "")),
        info.prompt_tokens,
        info.generated_tokens,
        info.num_slices,
        info.worker_id or NONE,
        fmt_s(info.ttft_s),
        fmt_s(info.latency_s),
    )


class SyncResult(NamedTuple):
    added: int
    updated_cells: int
    removed: int


class RequestsTable(DataTable):
    """Most recent requests first; a snapshot changes only the cells that changed."""

    def __init__(self, max_rows: int = 1000, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.max_rows = max_rows
        self._shown: dict[str, RequestInfo] = {}  # request_id -> what its row shows
        self._order: dict[str, int] = {}  # request_id -> arrival rank (higher is newer)
        self._next_rank = 0

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def sync(self, requests: list[RequestInfo]) -> SyncResult:
        """Mirror ``requests`` (most recent first, as in StatsSnapshot) in at most max_rows rows."""
        wanted = {info.request_id: info for info in requests[: self.max_rows]}
        gone = [rid for rid in self._shown if rid not in wanted]
        if len(gone) > _REBUILD_AT_REMOVALS:
            self._clear_rows()
            removed = len(gone)
        else:
            for rid in gone:
                self._forget(rid)
            removed = len(gone)
        added = updated = 0
        # Oldest first, so that ranks grow with recency.
        for rid, info in reversed(wanted.items()):
            old = self._shown.get(rid)
            if old is None:
                self.add_row(*_cells(info), key=rid)
                self._order[rid] = self._next_rank
                self._next_rank += 1
                added += 1
            elif old != info:
                updated += self._update_row(rid, old, info)
            self._shown[rid] = info
        if added:
            self.sort("id", key=self._order.__getitem__, reverse=True)
        return SyncResult(added, updated, removed)

    def _update_row(self, rid: str, old: RequestInfo, new: RequestInfo) -> int:
        num_updated = 0
        for (column, _, _), before, after in zip(COLUMNS, _cells(old), _cells(new), strict=True):
            if before != after:
                self.update_cell(rid, column, after)
                num_updated += 1
        return num_updated

    def _forget(self, rid: str) -> None:
        self.remove_row(rid)
        del self._shown[rid]
        del self._order[rid]

    def _clear_rows(self) -> None:
        self.clear()
        self._shown.clear()
        self._order.clear()
