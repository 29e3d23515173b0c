"""The discrete-event simulation: the real BrokerCore and policy, simulated workers, a simulated
client, and one event queue. No wall clock, no sleeps, no threads: time is the event queue's.

Events: a request due (open loop at its send time, closed loop when one ends), a worker's step
ending, a worker woken by handed-off KV arriving, and a broker round. As in the broker's loop
(engine/broker/server.py), a round (``BrokerCore.schedule``) follows whatever arrived, at most
one per ``tick_s`` of simulated time, and rounds repeat every ``tick_s`` while requests wait and
nothing else is due. Messages between the broker and the workers take no time; a worker starts
its next step as soon as one ends (its loop never waits for the broker).

The one clock read is this thread's CPU time around each call into the broker core, to report
what the real broker would spend on the simulated traffic (``SimOutcome.broker_cpu_s``); no
decision depends on it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from time import thread_time

from engine import protocol as p
from engine.bench.progress import Progress
from engine.bench.records import RequestRecord, TimelineSample, WorkerSample
from engine.broker.admission import QueueLimits
from engine.broker.core import BrokerCore, ToClient, ToWorker
from engine.broker.validation import Limits
from engine.config import SchedulerConfig
from engine.scheduler.factory import make_policy
from engine.sim.devices import DeviceModel
from engine.sim.worker import SimWorker

CLIENT_ID = b"sim"
VOCAB = 2**31 - 1  # token ids the simulated broker accepts
FILLER_TOKEN = 1  # what simulated prompts repeat (and workers sample: engine/sim/worker.py)
TICK_S = 0.005  # engine/broker/server.py: how often the broker asks the policy while busy
# Requests waiting, nothing running, nothing due: after this long the run stops as stalled (a
# policy that never places them would otherwise poll forever).
STALL_S = 60.0

_ARRIVE, _STEP, _WAKE, _ROUND = range(4)


@dataclass(frozen=True, slots=True)
class SimItem:
    """One request of the load: its lengths, and max_tokens when lengths are hidden."""

    index: int
    prompt_len: int
    output_len: int
    max_tokens: int | None = None  # None: the output length (known lengths)
    # the prompt as (segment id, tokens) where equal ids are equal text (RequestSpec.segments);
    # None: a prompt of its own, which shares no prefix with any other
    segments: tuple[tuple[int, int], ...] | None = None


@dataclass(slots=True)
class SimOutcome:
    records: list[RequestRecord]
    duration_s: float
    cut_off_s: float | None
    timeline: list[TimelineSample]
    batches: list[dict]
    events: list[dict]
    workers_end: dict[str, dict[str, float]]
    num_events: int
    num_rounds: int
    stall: dict | None = None  # why the run stopped before every request ended, if it did
    # CPU seconds this process spent inside the broker core (intake, rounds, worker messages,
    # cancels): what the real broker would spend on this traffic, before sockets, msgpack,
    # detokenizing and its journal. Measured, so it differs from run to run.
    broker_cpu_s: float = 0.0


class Simulation:
    """One policy over one load on simulated workers (``devices[i]`` for worker i)."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        devices: Sequence[DeviceModel],
        noise: float = 0.0,
        seed: int = 0,
        tick_s: float = TICK_S,
        stats_interval_s: float = 0.25,
        refine: bool = True,
        prefix_cache: bool = True,
        stream_interval: int = 1,
    ) -> None:
        limits = Limits(min(d.max_context_len for d in devices), cfg.max_gen_len, VOCAB)
        self.core = BrokerCore(cfg, make_policy(cfg), lambda ids: "", limits, QueueLimits())
        self.workers = [
            SimWorker(
                f"sim-{i}",
                dev,
                self._peer,
                noise,
                seed * 1000 + i,
                refine,
                prefix_cache,
                stream_interval,
            )  # fmt: skip
            for i, dev in enumerate(devices)
        ]
        self._by_id = {w.worker_id: w for w in self.workers}
        self._index = {w.worker_id: i for i, w in enumerate(self.workers)}
        self.tick_s = tick_s
        self.stats_interval_s = stats_interval_s
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = itertools.count()
        self._round_at: float | None = None
        self._stuck_since: float | None = None
        self._last_round = -float("inf")
        self._filler: list[int] = []  # the token every simulated prompt repeats
        self.num_events = self.num_rounds = 0
        self.broker_cpu_s = 0.0
        self.clock = 0.0  # simulated seconds: the time of the event being handled
        self.progress: Progress | None = None
        for w in self.workers:
            self.core.add_worker(w.worker_id.encode(), w.ready(), 0.0)

    def _peer(self, worker_id: str) -> SimWorker | None:
        return self._by_id.get(worker_id)

    def _push(self, at: float, kind: int, arg: int = 0) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), kind, arg))

    # -- the run --------------------------------------------------------------------------------

    def run(
        self,
        items: Sequence[SimItem],
        send_times: Sequence[float] | None,
        concurrency: int | None = None,
        max_duration_s: float = float("inf"),
        progress: Progress | None = None,
    ) -> SimOutcome:
        """Send every item (at ``send_times``, or a closed loop of ``concurrency``) and run
        until every request ended or ``max_duration_s`` of simulated time passed; each request
        that ends advances ``progress``."""
        self.progress = progress
        if progress is not None:
            progress.start()
        self.items = list(items)
        self.records = [
            RequestRecord(it.index, it.prompt_len, it.output_len, None if send_times is None else t)
            for it, t in zip(items, send_times or [None] * len(items), strict=True)
        ]
        self._by_rid: dict[str, int] = {}
        self._next_item = 0
        self.timeline: list[TimelineSample] = []
        self.batches: list[dict] = []
        self._next_sample = 0.0
        first = len(items) if send_times is not None else min(concurrency or 1, len(items))
        for i in range(first):
            self._push(send_times[i] if send_times is not None else 0.0, _ARRIVE, i)
        self._next_item = first
        self._closed = send_times is None
        now, cut_off = 0.0, None
        while self._heap:
            at, _, kind, arg = heapq.heappop(self._heap)
            if at > max_duration_s:
                cut_off = max_duration_s
                break
            now = self.clock = at
            self.num_events += 1
            self._handle(kind, arg, now)
        stall = None
        if cut_off is None and self.core.requests:  # stalled: what is left never ends
            cut_off, stall = now, self._stalled(now)
        self._sample(now, force=True)
        if progress is not None:
            progress.finish()
        return self._outcome(now, cut_off, stall)

    def _stalled(self, now: float) -> dict:
        """Mark the requests still open as stalled; why the run stopped."""
        for rec in self.records:
            if rec.finished_s is None and rec.submitted_s is not None:
                rec.finish_reason = "stalled"
        reason = (
            f"{len(self.core.waiting)} requests waited {STALL_S:.0f} s with nothing running: "
            "the policy placed none of them"
        )
        return {"detected_s": now, "reason": reason}

    def _handle(self, kind: int, arg: int, now: float) -> None:
        if kind == _ARRIVE:
            self._submit(arg, now)
        elif kind == _STEP:
            worker = self.workers[arg]
            for msg in worker.end_step(now):
                self._from_worker(worker, msg, now)
            self._start(worker, now)
        elif kind == _WAKE:
            if not self.workers[arg].stepping:
                self._start(self.workers[arg], now)
        elif kind == _ROUND:
            self._round_at = None
            self._round(now)
            return
        self._route(now)
        self._want_round(now)

    def _want_round(self, now: float) -> None:
        if self._round_at is None:
            self._round_at = max(now, self._last_round + self.tick_s)
            self._push(self._round_at, _ROUND)

    def _round(self, now: float) -> None:
        self._last_round = now
        self.num_rounds += 1
        started = thread_time()
        self.core.schedule(now)
        self.broker_cpu_s += thread_time() - started
        self._route(now)
        self._sample(now)
        quiet = not self._heap and not any(w.stepping for w in self.workers)
        if not (self.core.waiting and quiet):
            self._stuck_since = None
        elif self._stuck_since is None:
            self._stuck_since = now
        idle = not self._heap or self._heap[0][0] > now + self.tick_s
        stuck = self._stuck_since is not None and now - self._stuck_since >= STALL_S
        if self.core.waiting and idle and not stuck:  # the broker polls while requests wait
            self._want_round(now)

    def _start(self, worker: SimWorker, now: float) -> None:
        if worker.stepping:
            return
        for msg in worker.flush(now):  # releases of commands applied while it was idle
            self._from_worker(worker, msg, now)
        wake = worker.next_wake_at(now)
        if wake is None:
            return
        if wake > now:
            self._push(wake, _WAKE, self._index[worker.worker_id])
            return
        end = worker.start_step(now)
        if end is not None:
            self._push(end, _STEP, self._index[worker.worker_id])
        else:  # nothing started (every candidate refused): its releases go out now
            for msg in worker.flush(now):
                self._from_worker(worker, msg, now)

    # -- messages -------------------------------------------------------------------------------

    def _from_worker(self, worker: SimWorker, msg, now: float) -> None:
        started = thread_time()
        self.core.on_worker_message(self.core.workers[worker.worker_id], msg, now)
        self.broker_cpu_s += thread_time() - started
        if isinstance(msg, p.BatchDone):
            record = self.core.batch_records[-1] if self.core.batch_records else None
            if record is not None and record.batch_id == msg.batch_id:
                self.batches.append({f: getattr(record, f) for f in record.__struct_fields__})

    def _route(self, now: float) -> None:
        """Deliver the broker's outbox until it is empty (a delivery may answer at once)."""
        touched: set[int] = set()
        while self.core.outbox:
            out, self.core.outbox = self.core.outbox, []
            for msg in out:
                if isinstance(msg, ToWorker):
                    touched.add(self._to_worker(msg, now))
                elif isinstance(msg, ToClient):
                    self._to_client(msg.msg, now)
            for i in sorted(touched):
                self._start(self.workers[i], now)
            touched.clear()

    def _to_worker(self, out: ToWorker, now: float) -> int:
        if isinstance(out.msg, p.RunBatch | p.Renew | p.Abort | p.DropKV):
            self._by_id[out.worker_id].command(out.msg, now)
        return self._index[out.worker_id]

    # -- the client -----------------------------------------------------------------------------

    def _submit(self, index: int, now: float) -> None:
        item, rec = self.items[index], self.records[index]
        prompt = self._prompt(item)
        rec.request_id = f"sim-{item.index}"
        rec.submitted_s = now
        rec.finish_reason = "timeout"  # until it ends otherwise
        rec.hidden_length = item.max_tokens is not None and item.max_tokens > item.output_len
        self._by_rid[rec.request_id] = index
        msg = p.Submit(
            request_id=rec.request_id, prompt_ids=prompt, stream=True, ignore_eos=True,
            max_tokens=item.max_tokens or item.output_len,
        )  # fmt: skip
        started = thread_time()
        self.core.submit(CLIENT_ID, msg, prompt, now)
        self.broker_cpu_s += thread_time() - started

    def _prompt(self, item: SimItem) -> list[int]:
        """Token ids the prefix caches see, as bench's prompts (engine/bench/prompts.py): each
        segment starts with a token of its own and repeats one token after it, so equal segment
        ids are equal text and unequal ones share no block (names chain over the whole prefix);
        what the segments leave of the prompt, or a prompt without segments, is its own."""
        parts = list(item.segments or ())
        covered = sum(n for _, n in parts)
        if covered < item.prompt_len:
            parts.append((-1 - item.index, item.prompt_len - covered))
        longest = max(n for _, n in parts)
        if len(self._filler) < longest:
            self._filler = [FILLER_TOKEN] * max(longest, 2 * len(self._filler))
        prompt: list[int] = []
        for segment_id, n in parts:
            if n > 0:
                prompt.append(FILLER_TOKEN + 1 + segment_id % (VOCAB - FILLER_TOKEN - 1))
                prompt += self._filler[: n - 1]
        return prompt[: item.prompt_len]

    def _to_client(self, msg, now: float) -> None:
        index = self._by_rid.get(getattr(msg, "request_id", None) or "")
        if index is None:
            return
        item, rec = self.items[index], self.records[index]
        if rec.finished_s is not None:
            return  # ended already (a hidden length's cancel)
        if isinstance(msg, p.Delta):
            rec.take_tokens(now, len(msg.token_ids))
            if rec.hidden_length and rec.num_output_tokens >= item.output_len:
                rec.finish_reason, rec.finished_s = "length", now
                live = self.core.requests.get(rec.request_id)
                if live is not None:
                    rec.num_slices, rec.cached_tokens = live.num_slices, live.cached_tokens
                started = thread_time()
                self.core.cancel(CLIENT_ID, rec.request_id, now)
                self.broker_cpu_s += thread_time() - started
                self._ended(rec, now)
        elif isinstance(msg, p.Finished):
            rec.finish_reason, rec.finished_s = msg.finish_reason, now
            rec.num_slices, rec.cached_tokens = msg.num_slices, msg.usage.cached_tokens
            self._ended(rec, now)
        elif isinstance(msg, p.Error):
            rec.finish_reason, rec.error, rec.finished_s = "error", msg.message, now
            self._ended(rec, now)

    def _ended(self, rec: RequestRecord, now: float) -> None:
        if rec.request_id is not None:
            for worker in self.workers:
                worker.forget(rec.request_id)
        if self.progress is not None:
            self.progress.advance(rec.success)
        if self._closed and self._next_item < len(self.items):
            self._push(now, _ARRIVE, self._next_item)
            self._next_item += 1

    # -- what the benchmark records -------------------------------------------------------------

    def _sample(self, now: float, force: bool = False) -> None:
        if now < self._next_sample and not force:
            return
        self._next_sample = now + self.stats_interval_s
        core, workers = self.core, []
        for w in self.workers:
            state = core.workers[w.worker_id]
            peak = max((b.dispatch.predicted_peak_bytes for b in state.batches.values()), default=0)
            workers.append(WorkerSample(
                worker_id=w.worker_id, busy=bool(state.batches), busy_s=state.busy_s,
                generated_tokens=state.generated_tokens, num_running_requests=w.num_running,
                kv_used_bytes=w.pool.used_bytes + w.store.staged_bytes,
                kv_parked_bytes=w.store.parked_bytes, kv_predicted_peak_bytes=peak,
                kv_budget_bytes=w.device.kv_budget_bytes,
            ))  # fmt: skip
        num_running = len(core.requests) - len(core.waiting)
        self.timeline.append(
            TimelineSample(now, len(core.waiting), num_running, workers, core.num_preempted)
        )

    def _outcome(self, now: float, cut_off: float | None, stall: dict | None) -> SimOutcome:
        ends = [r.finished_s for r in self.records if r.finished_s is not None]
        events = [{"at_s": at, "level": lvl, "message": m} for at, lvl, m in self.core.events]
        prefix = self.core.prefix  # what the broker's index says each cache holds, as in stats
        totals = {
            wid: {
                "busy_s": w.busy_s,
                "generated_tokens": float(w.generated_tokens),
                "prefix_hit_tokens": float(w.prefix_hit_tokens),
                "prefix_cached_tokens": float(prefix.num_blocks(wid) * prefix.block_tokens(wid)),
            }
            for wid, w in self.core.workers.items()
        }
        return SimOutcome(
            records=self.records,
            duration_s=cut_off if cut_off is not None else max(ends, default=now),
            cut_off_s=cut_off,
            timeline=self.timeline,
            batches=self.batches,
            events=events,
            workers_end=totals,
            num_events=self.num_events,
            num_rounds=self.num_rounds,
            stall=stall,
            broker_cpu_s=self.broker_cpu_s,
        )
