"""Test doubles for the dashboard: a stub StatsSource, a fake clock, snapshot builders, helpers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from textual.geometry import Region
from textual.pilot import Pilot
from textual.widget import Widget

from engine.protocol import BatchInfo, LogEvent, RequestInfo, StatsSnapshot, WorkerStats

GIB = 1024**3


class StubSource:
    """A StatsSource fed by the test: ``push`` a snapshot, the app receives it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[StatsSnapshot] = asyncio.Queue()
        self.closed = False

    def push(self, snapshot: StatsSnapshot) -> None:
        self.queue.put_nowait(snapshot)

    async def recv(self, timeout_s: float) -> StatsSnapshot | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.closed = True


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def batch(batch_id: int = 1, **fields) -> BatchInfo:
    defaults = dict(
        num_requests=8,
        padded_len=128,
        max_steps=64,
        predicted_s=0.84,
        predicted_peak_bytes=GIB,
    )
    return BatchInfo(batch_id=batch_id, **{**defaults, **fields})


def worker(worker_id: str = "w0", **fields) -> WorkerStats:
    defaults = dict(
        device="cpu",
        state="busy",
        queued=[],
        running=[],
        num_running_requests=0,
        kv_used_bytes=GIB,
        kv_parked_bytes=0,
        kv_predicted_peak_bytes=2 * GIB,
        kv_budget_bytes=4 * GIB,
        mem_used_bytes=None,
        mem_total_bytes=None,
        util_percent=None,
        tokens_per_s=100.0,
        generated_tokens=0,
        busy_s=0.0,
    )
    return WorkerStats(worker_id=worker_id, **{**defaults, **fields})


def request(request_id: str, **fields) -> RequestInfo:
    defaults = dict(
        state="running",
        prompt_tokens=20,
        generated_tokens=5,
        num_slices=1,
        worker_id="w0",
        ttft_s=0.12,
        latency_s=None,
    )
    return RequestInfo(request_id=request_id, **{**defaults, **fields})


def event(at_s: float, message: str, level: str = "info") -> LogEvent:
    return LogEvent(at_s=at_s, level=level, message=message)


def snapshot(**fields) -> StatsSnapshot:
    defaults = dict(
        uptime_s=10.0,
        policy="scls",
        slice_len=64,
        max_gen_len=1024,
        kv_mode="keep",
        num_workers=1,
        num_waiting=3,
        num_running=8,
        num_finished=120,
        num_failed=0,
        request_throughput=3.2,
        token_throughput=812.0,
        ttft_p50_s=0.12,
        ttft_p99_s=0.45,
        e2e_p50_s=2.1,
        e2e_p99_s=5.8,
        workers=[worker()],
        requests=[],
        events=[],
        batches=[],
    )
    return StatsSnapshot(**{**defaults, **fields})


def rendered_text(widget: Widget) -> str:
    """What the widget and its visible descendants render now (borders included), as text."""
    parts = [_own_text(widget)]
    for child in widget.walk_children(Widget):
        if child.display and not child.children:
            parts.append(_own_text(child))
    return "\n".join(parts)


def _own_text(widget: Widget) -> str:
    width, height = widget.outer_size
    strips = widget.render_lines(Region(0, 0, width, height))
    return "\n".join(strip.text.rstrip() for strip in strips)


async def wait_for(pilot: Pilot, condition: Callable[[], bool], what: str, timeout_s=5.0) -> None:
    """Let the app run until ``condition()`` holds; fail (not hang) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await pilot.pause(0.02)
