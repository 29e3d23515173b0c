"""Peers: the same workload (prompt ids, output lengths, arrivals) served in-process by two real
libraries a user would otherwise pick, on the same model and dtype, with as many torch threads
as the engine's workers have together.

- ``hf_generate``: transformers ``generate()`` on static FCFS batches of a fixed size (what a
  user writes by hand): greedy, ``min_new_tokens = max_new_tokens`` = the longest request of
  the batch, each request keeping its own first ``output_len`` tokens (the rest are counted as
  invalid tokens). A request is done when its own last token was produced (a streamer stamps
  every step), which favours this peer over waiting for ``generate()`` to return.
- ``hf_generate_batch``: transformers continuous batching, through the manager that
  ``generate_batch`` wraps (``continuous_batching_context_manager``), because ``generate_batch``
  takes one ``max_new_tokens`` for all requests and no arrival times: each request is added at
  its arrival with its own ``max_new_tokens``, EOS disabled (``eos_token_id=-1``), streamed.
  With hidden lengths it asks for ``max_tokens`` and is cancelled once its length arrived, as
  the engine's requests are. (``hf_generate`` needs no such mode: a static batch always runs to
  its longest request, which is what EOS at each request's length would do.)

A peer run is cut short at ``max_duration_s``, and ``hf_generate_batch`` also when no request
received a token for ``stall_timeout_s`` while some were in flight; the run then records the
cut-off (throughputs divide by it) and, for a stall, why, with transformers' cache state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.bench.loadgen import LoadItem, new_records
from engine.bench.progress import Progress, StallWatch
from engine.bench.records import RequestRecord

log = logging.getLogger(__name__)

PEER_NAMES = ("hf_generate", "hf_generate_batch")


class PeerError(ValueError):
    """A peer that cannot run as asked; the message says what to change."""


@dataclass(frozen=True, slots=True)
class PeerSettings:
    model: str
    dtype: str
    num_threads: int  # torch threads: the engine's workers' threads together
    kv_budget_bytes: int  # the engine's KV budget, all workers together
    batch_size: int | None = None  # hf_generate; None: the most that fits kv_budget_bytes
    page_size: int = 32  # hf_generate_batch: tokens per KV page
    max_batch_tokens: int = 1024  # hf_generate_batch: tokens per forward (prefill chunks)
    max_batch_size: int = 256
    max_duration_s: float = 600.0
    stall_timeout_s: float | None = 60.0  # hf_generate_batch; None: wait until max_duration_s


@dataclass(slots=True)
class PeerOutcome:
    """What a peer run returns. ``duration_s``: to the last request's end, or to the cut-off
    (``cut_off_s``, seconds from the start) when the run was cut short; ``stall``: why it
    stopped making progress (None if it did not)."""

    records: list[RequestRecord]
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    cut_off_s: float | None = None
    stall: dict[str, Any] | None = None


def _outcome(
    records: list[RequestRecord], cut_off_s: float | None, extra: dict[str, Any], **kwargs: Any
) -> PeerOutcome:
    """The duration is the last end when every request succeeded; otherwise the time to the
    cut-off (when the run stopped), never the time to the last request that happened to
    finish."""
    if all(r.success for r in records):
        cut_off_s = None
    ends = [r.finished_s for r in records if r.finished_s is not None]
    duration_s = cut_off_s if cut_off_s is not None else max(ends, default=0.0)
    return PeerOutcome(records, duration_s, extra, cut_off_s, **kwargs)


class _Feed:
    """When each request becomes available: open loop at its send time; closed loop when one
    of the ``concurrency`` requests in flight ends."""

    def __init__(self, num: int, send_times: Sequence[float] | None, concurrency: int | None):
        if send_times is None:
            assert concurrency is not None
            first = min(num, concurrency)
            self.ready_at: dict[int, float] = {i: 0.0 for i in range(first)}
            self._next: int | None = first
        else:
            self.ready_at = {i: float(t) for i, t in enumerate(send_times)}
            self._next = None
        self.num = num
        self._taken: set[int] = set()

    def due(self, now_s: float) -> list[int]:
        """Available, not yet taken requests, oldest first."""
        ready = [i for i, t in self.ready_at.items() if t <= now_s and i not in self._taken]
        return sorted(ready, key=lambda i: (self.ready_at[i], i))

    def take(self, indices: Sequence[int]) -> None:
        self._taken.update(indices)

    def next_at(self) -> float | None:
        waiting = [t for i, t in self.ready_at.items() if i not in self._taken]
        return min(waiting) if waiting else None

    def on_finish(self, at_s: float) -> None:
        if self._next is not None and self._next < self.num:
            self.ready_at[self._next] = at_s
            self._next += 1

    @property
    def all_taken(self) -> bool:
        return len(self._taken) == self.num


def _load(settings: PeerSettings):
    import torch

    from engine.worker.model_loader import load_model

    torch.set_num_threads(settings.num_threads)
    loaded = load_model(settings.model, "cpu", settings.dtype)
    return loaded


def _pad_id(loaded) -> int:
    gen = loaded.model.generation_config
    for value in (gen.pad_token_id, loaded.model.config.pad_token_id, *loaded.info.eos_token_ids):
        if isinstance(value, int):
            return value
    return 0


def _records(items: Sequence[LoadItem], send_times: Sequence[float] | None) -> list[RequestRecord]:
    records = new_records(items, send_times)
    for record in records:
        record.request_id = f"peer-{record.index}"
    return records


def static_batch_size(settings: PeerSettings, items: Sequence[LoadItem], kv_bytes: int) -> int:
    """The fixed batch size: given, or the most requests whose worst case (longest prompt plus
    longest output of the workload) fits the KV budget."""
    if settings.batch_size is not None:
        return settings.batch_size
    worst = max(len(it.prompt_ids) for it in items) + max(it.output_len for it in items)
    return max(1, min(settings.max_batch_size, settings.kv_budget_bytes // (worst * kv_bytes)))


def run_hf_generate(
    settings: PeerSettings,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None,
    progress: Progress,
) -> PeerOutcome:
    """Static FCFS batches through ``model.generate``."""
    import torch
    from transformers import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    loaded = _load(settings)
    model, pad_id = loaded.model, _pad_id(loaded)
    batch_size = static_batch_size(settings, items, loaded.info.kv_bytes_per_token)
    records, feed = _records(items, send_times), _Feed(len(items), send_times, concurrency)

    class StepClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.num_puts = 0

        def put(self, value) -> None:
            self.num_puts += 1
            if self.num_puts > 1:  # the first put is the prompt
                self.times.append(time.monotonic() - t0)

        def end(self) -> None:
            pass

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            late = time.monotonic() - t0 > settings.max_duration_s
            return torch.full((input_ids.shape[0],), late, dtype=torch.bool)

    def generate(batch: list[LoadItem], clock: StepClock | None, max_new: int):
        width = max(len(it.prompt_ids) for it in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, it in enumerate(batch):  # left padding: last tokens aligned
            ids[row, width - len(it.prompt_ids) :] = torch.tensor(it.prompt_ids)
            mask[row, width - len(it.prompt_ids) :] = 1
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                min_new_tokens=max_new, pad_token_id=pad_id, streamer=clock,
                stopping_criteria=[Deadline()],
            )  # fmt: skip
        return width

    t0 = time.monotonic()
    generate(list(items[:1]), None, 2)  # warm-up, not timed
    counters = {"pad_tokens": 0, "invalid_tokens": 0, "num_batches": 0}
    t0, cpu_before = time.monotonic(), time.process_time()
    progress.start()
    while not feed.all_taken and time.monotonic() - t0 < settings.max_duration_s:
        now_s = time.monotonic() - t0
        due = feed.due(now_s)
        if not due:
            next_at = feed.next_at()
            if next_at is None:
                break
            time.sleep(max(0.0, min(next_at - now_s, 0.5)))
            continue
        chosen = due[:batch_size]
        feed.take(chosen)
        batch = [items[i] for i in chosen]
        max_new = max(it.output_len for it in batch)
        for i in chosen:
            records[i].submitted_s = feed.ready_at[i]
        clock = StepClock()
        width = generate(batch, clock, max_new)
        counters["num_batches"] += 1
        for i, it in zip(chosen, batch, strict=True):
            rec = records[i]
            for at_s in clock.times[: it.output_len]:
                rec.add_chunk(at_s, 1)
            counters["pad_tokens"] += (width - len(it.prompt_ids)) * len(clock.times)
            counters["invalid_tokens"] += max(0, len(clock.times) - it.output_len)
            rec.num_slices = 1
            if rec.num_output_tokens == it.output_len:
                rec.finish_reason, rec.finished_s = "length", rec.chunk_times_s[-1]
            else:
                rec.finish_reason = "timeout"
            feed.on_finish(rec.finished_s if rec.finished_s is not None else time.monotonic() - t0)
            progress.advance(rec.success)
    progress.finish()
    cut_off_s = time.monotonic() - t0
    extra = {
        "batch_size": batch_size,
        "num_threads": settings.num_threads,
        "metrics": {
            **counters,
            "kv_budget_bytes": settings.kv_budget_bytes,
            "cpu_s": time.process_time() - cpu_before,
        },
    }
    return _outcome(records, cut_off_s, extra)


def run_hf_generate_batch(
    settings: PeerSettings,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None,
    progress: Progress,
) -> PeerOutcome:
    """transformers continuous batching with per-request lengths and arrivals."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    loaded = _load(settings)
    model, kv_bytes = loaded.model, loaded.info.kv_bytes_per_token
    num_blocks = max(1, settings.kv_budget_bytes // (settings.page_size * kv_bytes))
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(it.output_len for it in items),
        eos_token_id=-1,
        pad_token_id=_pad_id(loaded),
    )
    cb_config = ContinuousBatchingConfig(
        num_blocks=num_blocks,
        page_size=settings.page_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_requests_per_batch=settings.max_batch_size,
    )
    records, feed = _records(items, send_times), _Feed(len(items), send_times, concurrency)
    with (
        _counting_offloads() as offloads,
        model.continuous_batching_context_manager(
            generation_config=gen_config,
            continuous_batching_config=cb_config,
            warmup=False,
            block=True,
            timeout=10,
        ) as manager,
    ):
        _warm_up(manager, items[0])
        t0, cpu_before = time.monotonic(), time.process_time()
        progress.start()
        stall = _serve(manager, items, records, feed, t0, settings, progress)
        cut_off_s = time.monotonic() - t0
        progress.finish()
        cpu_s = time.process_time() - cpu_before
    extra = {
        "num_blocks": num_blocks,
        "page_size": settings.page_size,
        "max_batch_tokens": settings.max_batch_tokens,
        "num_threads": settings.num_threads,
        "attn_implementation": str(getattr(model.config, "_attn_implementation", "")),
        "metrics": {
            "kv_budget_bytes": num_blocks * settings.page_size * kv_bytes,
            "cpu_s": cpu_s,
            "preemptions": offloads.num_soft_reset + offloads.num_cpu,
            "num_soft_resets": offloads.num_soft_reset,
            "num_cpu_offloads": offloads.num_cpu,
        },
    }
    return _outcome(records, cut_off_s, extra, stall=stall)


class _OffloadCounter(logging.Handler):
    """Counts transformers' "Offloaded N requests (C to CPU, S soft reset)" log records: its
    only report of the requests it preempted when its cache was full (a soft reset frees a
    request's blocks and requeues it to be prefilled again with what it generated)."""

    PATTERN = re.compile(r"Offloaded \d+ requests \((\d+) to CPU, (\d+) soft reset\)")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.num_cpu = 0
        self.num_soft_reset = 0

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.num_cpu += int(match[1])
            self.num_soft_reset += int(match[2])


@contextlib.contextmanager
def _counting_offloads() -> Iterator[_OffloadCounter]:
    """Lets transformers' continuous-batching logger emit INFO records to the counter only
    (its own console handler keeps its former threshold), restoring both afterwards."""
    logger = logging.getLogger("ContinuousBatchingLogger")
    counter, level = _OffloadCounter(), logger.level
    quiet = [(h, h.level) for h in logger.handlers]
    for handler, handler_level in quiet:
        handler.setLevel(max(handler_level, logger.getEffectiveLevel()))
    logger.addHandler(counter)
    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
        for handler, handler_level in quiet:
            handler.setLevel(handler_level)


def _warm_up(manager, item: LoadItem) -> None:
    manager.add_request(
        list(item.prompt_ids), request_id="warmup", max_new_tokens=2, eos_token_id=-1
    )
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline and manager.is_running():
        result = manager.get_result(timeout=1.0)
        if result is not None and result.request_id == "warmup" and result.is_finished():
            return
    raise PeerError(
        "transformers continuous batching did not answer a 2-token warm-up (see its log above): "
        "lower --peer-max-batch-tokens or --kv-budget if it ran out of memory"
    )


def _serve(
    manager, items, records, feed: _Feed, t0: float, settings: PeerSettings, progress: Progress
) -> dict[str, Any] | None:
    """Add requests as they arrive, stamp every streamed output, until all end, time is up
    (the rest: "timeout") or no token came for ``settings.stall_timeout_s`` while requests
    were in flight (the rest: "stalled"; returns why). A request with a hidden length asks
    for ``max_tokens`` and is cancelled at its length."""
    live: set[int] = set()
    watch = StallWatch(settings.stall_timeout_s)
    while not feed.all_taken or live:
        now_s = time.monotonic() - t0
        if now_s >= settings.max_duration_s or watch.stalled(now_s):
            break
        for i in feed.due(now_s):
            feed.take([i])
            records[i].submitted_s = now_s
            manager.add_request(
                list(items[i].prompt_ids), request_id=f"peer-{i}", streaming=True,
                max_new_tokens=items[i].max_tokens or items[i].output_len, eos_token_id=-1,
            )  # fmt: skip
            live.add(i)
            watch.sent(now_s)
        next_at = feed.next_at()
        wait_s = 0.05 if next_at is None else max(0.001, min(0.05, next_at - now_s))
        result = manager.get_result(timeout=wait_s)
        if result is None and not manager.is_running():
            _fail_all(records, live, "transformers' generation loop stopped (see its log above)")
            return None
        if result is None or not result.request_id.startswith("peer-"):
            continue
        i = int(result.request_id.removeprefix("peer-"))
        if i in live and _take_output(
            manager, result, items[i], records[i], time.monotonic() - t0, watch
        ):
            live.discard(i)
            feed.on_finish(records[i].finished_s)
            progress.advance(records[i].success)
    stall = None
    if live and watch.stalled(time.monotonic() - t0):
        stall = stall_report(watch, time.monotonic() - t0, cache_state(manager))
        progress.note(f"stopped: {stall['reason']}")
    for i in live:
        manager.cancel_request(f"peer-{i}")
        records[i].finish_reason = "stalled" if stall else "timeout"
    return stall


def _take_output(manager, result, item: LoadItem, rec: RequestRecord, at_s: float, watch) -> bool:
    """Count a streamed output of a live request; True when the request ended (its length
    reached, which cancels the rest when the length is hidden, or transformers finished it)."""
    num_new = len(result.generated_tokens) - rec.num_output_tokens - rec.excess_tokens
    used = min(num_new, item.output_len - rec.num_output_tokens)
    rec.add_chunk(at_s, used)
    rec.excess_tokens += num_new - used
    if num_new > 0:
        watch.tokens(at_s)
    reached = item.hidden_length and rec.num_output_tokens >= item.output_len
    if reached:
        manager.cancel_request(result.request_id)
    if not (reached or result.is_finished()):
        return False
    watch.ended()
    rec.finished_s, rec.num_slices = at_s, 1
    failed = not reached and result.error is not None
    rec.finish_reason = "error" if failed else "length"
    rec.error = result.error if failed else None
    return True


def cache_state(manager) -> dict[str, Any]:
    """What transformers' continuous batching holds now: KV blocks free of total (its own
    free-capacity figure), active and waiting requests (of them, how many were soft-reset,
    i.e. will recompute, or offloaded to the CPU), and whether its scheduler admits waiting
    requests (``block_new_requests``: set by an offload, cleared when a request finishes).
    Read from transformers' internals (5.x); {"unavailable": why} when they differ."""
    try:
        processor = manager.batch_processor
        cache, scheduler = processor.cache, processor.scheduler
        states = [*scheduler.active_requests.values(), *scheduler.waiting_requests.values()]
        return {
            "num_blocks": int(cache.num_blocks),
            "num_free_blocks": int(round(cache.compute_free_capacity() * cache.num_blocks)),
            "num_active_requests": len(scheduler.active_requests),
            "num_waiting_requests": len(scheduler.waiting_requests),
            "num_soft_reset": sum(bool(getattr(st, "_true_initial_tokens", 0)) for st in states),
            "num_cpu_offloaded": sum(bool(getattr(st, "is_cpu_offloaded", False)) for st in states),
            "block_new_requests": bool(scheduler.block_new_requests),
        }
    except AttributeError as exc:
        log.warning("transformers' cache state is not readable (%s): not recorded", exc)
        return {"unavailable": f"not readable from this transformers version: {exc}"}


def stall_report(watch: StallWatch, now_s: float, state: dict[str, Any]) -> dict[str, Any]:
    """Why a run was stopped: how long nothing came, and the peer's cache at that moment."""
    reason = (
        f"no token for {now_s - watch.idle_since_s:.0f} s while {watch.num_in_flight} "
        f"requests were in flight (since {watch.idle_since_s:.1f} s)"
    )
    if "num_blocks" in state:
        reason += (
            f"; transformers' cache: {state['num_free_blocks']} of {state['num_blocks']} blocks "
            f"free, {state['num_active_requests']} active and {state['num_waiting_requests']} "
            f"waiting requests ({state['num_soft_reset']} soft-reset)"
        )
        if state["block_new_requests"] and not state["num_active_requests"]:
            reason += (
                ", admission blocked: after an offload its scheduler admits no waiting request "
                "until one finishes by itself, and requests cancelled at their length never do"
            )
    return {
        "since_s": watch.idle_since_s,
        "idle_s": now_s - watch.idle_since_s,
        "num_in_flight": watch.num_in_flight,
        "detected_s": now_s,
        "reason": reason,
        "cache": state,
    }


def _fail_all(records: list[RequestRecord], live: set[int], message: str) -> None:
    for i, rec in enumerate(records):
        if i in live or rec.finish_reason == "not_sent":
            rec.finish_reason, rec.error = "error", message
    live.clear()


RUNNERS = {"hf_generate": run_hf_generate, "hf_generate_batch": run_hf_generate_batch}


def run_peer(
    name: str,
    settings: PeerSettings,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None,
    progress: Progress,
) -> PeerOutcome:
    if name not in RUNNERS:
        raise PeerError(f"unknown peer {name!r}: use {', '.join(PEER_NAMES)}")
    if not items:
        raise PeerError("no requests to run")
    if settings.num_threads < 1 or not math.isfinite(settings.max_duration_s):
        raise PeerError("peers need at least one torch thread and a finite time limit")
    import torch

    threads_before = torch.get_num_threads()
    try:
        return RUNNERS[name](settings, items, send_times, concurrency, progress)
    finally:
        torch.set_num_threads(threads_before)
