"""The load generator: sends streaming requests to a running engine on an arrival schedule (or a
closed loop), stamps every stream delta with ``time.monotonic()``, and records the engine's
stats stream alongside. Bounded in requests and in time: at the deadline, requests still in
flight are cancelled on the engine and recorded as "timeout"; a run in which no token came for
--stall-timeout seconds while requests were in flight stops there ("stalled"). ``drive`` is the
part every load generator shares (engine/bench/endpoint.py sends the same load over HTTP)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.bench.progress import Progress, StallWatch
from engine.bench.records import RequestRecord, TimelineSample, WorkerSample
from engine.client import AsyncClient, AsyncStatsSubscriber, EngineError, StatsSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadItem:
    """One request to send. ``max_tokens`` None: ask for exactly ``output_len`` tokens (the
    engine knows the length, as in vLLM's benchmark). Larger: ask for ``max_tokens`` and stop
    listening (which cancels the request on the engine) once ``output_len`` tokens arrived, so
    that the scheduler does not know the length, as in production."""

    index: int
    prompt_ids: list[int]
    output_len: int
    max_tokens: int | None = None

    @property
    def hidden_length(self) -> bool:
        return self.max_tokens is not None and self.max_tokens > self.output_len


@dataclass(slots=True)
class LoadOutcome:
    records: list[RequestRecord]
    duration_s: float
    cut_off_s: float | None = None  # see Driven
    stall: dict[str, Any] | None = None
    timeline: list[TimelineSample] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    num_batches_missed: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    workers_start: dict[str, dict[str, float]] = field(default_factory=dict)
    workers_end: dict[str, dict[str, float]] = field(default_factory=dict)


def _worker_totals(snap: StatsSnapshot) -> dict[str, dict[str, float]]:
    return {
        w.worker_id: {
            "busy_s": w.busy_s,
            "generated_tokens": float(w.generated_tokens),
            "prefix_query_tokens": float(w.prefix_query_tokens),
            "prefix_hit_tokens": float(w.prefix_hit_tokens),
            "prefix_cached_tokens": float(w.prefix_cached_tokens),
        }
        for w in snap.workers
    }


class StatsRecorder:
    """Follows the broker's stats stream: a timeline of per-worker samples, and every batch
    record and event that appears, each once. Batch ids at or below ``after_batch_id`` (work
    done before the load) are ignored."""

    def __init__(self, stats_addr: str, t0: float, after_batch_id: int) -> None:
        self.t0 = t0
        self.after_batch_id = after_batch_id
        self.timeline: list[TimelineSample] = []
        self.batches: dict[int, dict[str, Any]] = {}
        self.events: dict[tuple[float, str], dict[str, Any]] = {}
        self.slices: dict[str, int] = {}  # request id -> most slices seen in a snapshot
        self._sub = AsyncStatsSubscriber(stats_addr, latest_only=False)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stats-recorder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sub.close()

    async def _run(self) -> None:
        while True:
            snap = await self._sub.recv(timeout_s=1.0)
            if snap is not None:
                self.add(snap, time.monotonic() - self.t0)

    def add(self, snap: StatsSnapshot, at_s: float) -> None:
        workers = [
            WorkerSample(
                worker_id=w.worker_id,
                busy=w.state == "busy",
                busy_s=w.busy_s,
                generated_tokens=w.generated_tokens,
                num_running_requests=w.num_running_requests,
                kv_used_bytes=w.kv_used_bytes,
                kv_parked_bytes=w.kv_parked_bytes,
                kv_predicted_peak_bytes=w.kv_predicted_peak_bytes,
                kv_budget_bytes=w.kv_budget_bytes,
            )
            for w in snap.workers
        ]
        self.timeline.append(
            TimelineSample(at_s, snap.num_waiting, snap.num_running, workers, snap.num_preempted)
        )
        for record in snap.batches:
            if record.batch_id > self.after_batch_id:
                self.batches.setdefault(record.batch_id, _struct_dict(record))
        for info in snap.requests:
            self.slices[info.request_id] = max(self.slices.get(info.request_id, 0), info.num_slices)
        for event in snap.events:
            key = (round(event.at_s, 6), event.message)
            self.events.setdefault(
                key, {"at_s": event.at_s, "level": event.level, "message": event.message}
            )

    def num_missed(self) -> int:
        """Batch ids after the start, up to the highest seen, without a record (a snapshot
        carries only the latest 64; ids of batches that never finished count too)."""
        if not self.batches:
            return 0
        return max(self.batches) - self.after_batch_id - len(self.batches)


def _struct_dict(obj: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(obj)


#: Sends one request and fills its record (times in seconds from ``t0``): ``submitted_s`` when
#: it is sent, a chunk per stream delta that carried tokens (``watch.tokens`` at each, so that
#: a stall is seen), ``finished_s`` and ``finish_reason`` at the end. Cancelling it must stop
#: the request on the server (leaving the stream does, for the client library and for HTTP).
Sender = Callable[[LoadItem, RequestRecord, float, StallWatch], Awaitable[None]]


@dataclass(slots=True)
class Driven:
    """What ``drive`` saw: the records, the run's duration, its cut-off (seconds from t0, None
    when every request ended by itself) and, for a run stopped by a stall, why."""

    records: list[RequestRecord]
    duration_s: float
    cut_off_s: float | None = None
    stall: dict[str, Any] | None = None


def new_records(
    items: Sequence[LoadItem], send_times: Sequence[float] | None
) -> list[RequestRecord]:
    return [
        RequestRecord(
            index=it.index,
            prompt_len=len(it.prompt_ids),
            output_len=it.output_len,
            scheduled_s=None if send_times is None else float(send_times[i]),
            hidden_length=it.hidden_length,
        )
        for i, it in enumerate(items)
    ]


async def drive(
    send: Sender,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None,
    t0: float,
    max_duration_s: float,
    stall_timeout_s: float | None,
    progress: Progress,
) -> Driven:
    """Send ``items`` with ``send`` (open loop at ``send_times`` offsets from ``t0``, or a
    closed loop of ``concurrency`` when send_times is None) until every request ended,
    ``max_duration_s`` passed (the rest: "timeout") or no token came for ``stall_timeout_s``
    while requests were in flight (the rest: "stalled", with why). Requests still in flight
    at the cut-off are cancelled on the server."""
    records = new_records(items, send_times)
    watch = StallWatch(stall_timeout_s, time.monotonic() - t0)

    async def one(i: int) -> None:
        watch.sent(time.monotonic() - t0)
        try:
            await send(items[i], records[i], t0, watch)
        finally:
            watch.ended()
        progress.advance(records[i].success)

    async def scheduled(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + send_times[i] - time.monotonic()))  # type: ignore[index]
        await one(i)

    queue = list(reversed(range(len(items))))

    async def user() -> None:
        while queue:
            i = queue.pop()
            records[i].scheduled_s = time.monotonic() - t0
            await one(i)

    progress.start()
    if send_times is None:
        assert concurrency is not None and concurrency >= 1
        tasks = [asyncio.create_task(user()) for _ in range(min(concurrency, len(items)))]
    else:
        tasks = [asyncio.create_task(scheduled(i)) for i in range(len(items))]
    pending, stalled = await _wait(tasks, t0 + max_duration_s, watch, t0)
    now_s = time.monotonic() - t0
    stall = stall_report(watch, now_s) if stalled else None  # before the cancels end them
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    progress.finish()
    if stall is not None:
        progress.note(f"stopped: {stall['reason']}")
        for rec in records:
            if rec.submitted_s is not None and rec.finished_s is None:
                rec.finish_reason = "stalled"
    ends = [r.finished_s for r in records if r.finished_s is not None]
    duration_s = max(ends) if ends else now_s
    cut_off_s = None
    if pending:
        cut_off_s = now_s if stalled else max_duration_s
        duration_s = max(duration_s, cut_off_s)
    return Driven(records, duration_s, cut_off_s, stall)


async def _wait(
    tasks: list[asyncio.Task[None]], deadline: float, watch: StallWatch, t0: float
) -> tuple[set[asyncio.Task[None]], bool]:
    """The tasks still running at the deadline or at a stall (and whether it was a stall)."""
    pending = set(tasks)
    while pending:
        now = time.monotonic()
        if watch.stalled(now - t0):
            return pending, True
        if now >= deadline:
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.25, deadline - now))
    return pending, False


def stall_report(watch: StallWatch, now_s: float) -> dict[str, Any]:
    """Why a run was stopped: how long nothing came and how many requests were waiting."""
    idle_s = now_s - watch.idle_since_s
    return {
        "since_s": watch.idle_since_s,
        "idle_s": idle_s,
        "num_in_flight": watch.num_in_flight,
        "detected_s": now_s,
        "reason": f"no token for {idle_s:.0f} s while {watch.num_in_flight} requests were in "
        f"flight (since {watch.idle_since_s:.1f} s)",
    }


async def _send_zmq(
    client: AsyncClient, tag: str, item: LoadItem, rec: RequestRecord, t0: float, watch: StallWatch
) -> None:
    rec.submitted_s = time.monotonic() - t0
    stream = client.stream(
        prompt_ids=item.prompt_ids,
        max_tokens=item.max_tokens or item.output_len,
        ignore_eos=True,
        temperature=0.0,
        request_id=f"{tag}-{item.index}",
    )
    rec.request_id = stream.request_id
    rec.finish_reason = "timeout"  # until it ends otherwise (a cancellation leaves it so)
    try:
        async with stream:
            async for delta in stream:
                at_s = time.monotonic() - t0
                rec.take_tokens(at_s, len(delta.token_ids))
                watch.tokens(at_s)
                if item.hidden_length and rec.num_output_tokens >= item.output_len:
                    rec.finish_reason, rec.finished_s = "length", at_s
                    return  # leaving the stream cancels the rest on the engine
    except EngineError as exc:
        rec.finish_reason, rec.error = "error", str(exc)
        rec.finished_s = time.monotonic() - t0
        return
    rec.finished_s = time.monotonic() - t0
    if stream.result is None:
        rec.finish_reason, rec.error = "error", "the stream ended without a result"
        return
    rec.finish_reason = stream.result.finish_reason
    rec.num_slices = stream.result.num_slices
    rec.cached_tokens = stream.result.usage.cached_tokens


async def _settle(client: AsyncClient, timeout_s: float = 5.0) -> StatsSnapshot | None:
    """The broker's snapshot once no worker has work dispatched (the last BatchDone arrives
    just after the last tokens), or after ``timeout_s``; None if the broker does not answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            snap = await client.stats(timeout_s=10.0)
        except EngineError as exc:
            log.warning("no final stats snapshot (%s): worker totals are left empty", exc)
            return None
        if all(w.state != "busy" for w in snap.workers) or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.1)


async def run_load(
    client_addr: str,
    stats_addr: str,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None = None,
    max_duration_s: float = 600.0,
    tag: str = "bench",
    progress: Progress | None = None,
    stall_timeout_s: float | None = None,
) -> LoadOutcome:
    """Send ``items`` to the engine (open loop at ``send_times`` offsets, or a closed loop of
    ``concurrency`` when send_times is None) and wait for all of them, at most
    ``max_duration_s`` from the first send; stop early when no token came for
    ``stall_timeout_s`` while requests were in flight (None: never)."""
    progress = progress or Progress(tag, len(items))
    async with AsyncClient(client_addr, connect_timeout_s=30.0) as client:
        start = await client.stats(timeout_s=30.0)
        after_id = max((b.batch_id for b in start.batches), default=0)
        t0 = time.monotonic() + 0.5  # time for the stats subscription to connect
        recorder = StatsRecorder(stats_addr, t0, after_id)
        recorder.start()
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        send = functools.partial(_send_zmq, client, tag)
        driven = await drive(
            send, items, send_times, concurrency, t0, max_duration_s, stall_timeout_s, progress
        )
        end = await _settle(client)
        if end is not None:
            recorder.add(end, time.monotonic() - t0)
        await recorder.stop()
    for rec in driven.records:  # a request left early (hidden length) has no Finished to tell
        if rec.num_slices == 0:
            rec.num_slices = recorder.slices.get(rec.request_id, 0)
    return LoadOutcome(
        records=driven.records,
        duration_s=driven.duration_s,
        cut_off_s=driven.cut_off_s,
        stall=driven.stall,
        timeline=recorder.timeline,
        batches=[recorder.batches[k] for k in sorted(recorder.batches)],
        num_batches_missed=recorder.num_missed(),
        events=list(recorder.events.values()),
        workers_start=_worker_totals(start),
        workers_end=_worker_totals(end) if end is not None else {},
    )
