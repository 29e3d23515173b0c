"""Engine-wide metrics from the broker's stats stream: gauges from the newest snapshot, and
counters accumulated from the batch records and worker lists of successive snapshots (each
batch counted once, by its id). docs/METRICS.md lists them."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.protocol import BatchRecord, StatsSnapshot

RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0)
MAX_REMEMBERED_BATCHES = 8192

#: Per-worker counters summed over its batch records: (metric, BatchRecord field, help).
BATCH_COUNTERS = (
    ("scls:batches", None, "Batches (dispatches) the worker ran."),
    ("scls:batch_early_returns", "early_return", "Batches that ended before their step budget."),
    ("scls:decode_steps", "steps", "Decode steps run."),
    ("scls:prefill_tokens", "prefill_tokens", "Tokens prefilled, padding included."),
    ("scls:pad_tokens", "pad_tokens", "Padding tokens prefilled."),
    ("scls:invalid_tokens", "invalid_tokens", "Decode positions of already finished requests."),
    ("scls:recomputed_tokens", "recomputed_tokens", "Context tokens prefilled again."),
    ("scls:reused_kv_tokens", "reused_kv_tokens", "Context tokens served from a kept KV cache."),
    ("scls:handoff_tokens", "handoff_tokens", "Context tokens whose KV another worker sent."),
    ("scls:handoff_bytes", "handoff_bytes", "Bytes of KV handed off by other workers."),
    ("scls:restored_tokens", "restored_tokens", "Context tokens restored from the host tier."),
    ("scls:batch_predicted_seconds", "predicted_s", "The time model's predicted batch time."),
    ("scls:batch_measured_seconds", "measured_s", "Measured batch time."),
)

#: Per-worker gauges of the newest snapshot: (metric, WorkerStats field, help).
WORKER_GAUGES = (
    ("scls:worker_running_requests", "num_running_requests", "Requests in its running batches."),
    ("scls:kv_used_bytes", "kv_used_bytes", "KV cache in use, as the worker measured it."),
    ("scls:kv_parked_bytes", "kv_parked_bytes", "KV cache kept on the device between slices."),
    ("scls:kv_offloaded_bytes", "kv_host_bytes", "KV cache offloaded to host memory."),
    ("scls:kv_budget_bytes", "kv_budget_bytes", "The KV budget the scheduler stays under."),
    ("scls:kv_host_budget_bytes", "kv_host_budget_bytes", "The host tier's budget."),
    ("scls:kv_predicted_peak_bytes", "kv_predicted_peak_bytes", "The memory model's peak."),
    ("scls:mem_used_bytes", "mem_used_bytes", "Device (GPU) or process (CPU) memory used."),
    ("scls:mem_total_bytes", "mem_total_bytes", "Device or host memory."),
    ("scls:device_util_percent", "util_percent", "GPU utilisation."),
    ("scls:worker_tokens_per_second", "tokens_per_s", "Its recent generation rate."),
    ("scls:prefix_cached_tokens", "prefix_cached_tokens", "Tokens in its prefix-cache blocks."),
)
# vLLM's prefix-cache counters (tokens), per worker
WORKER_COUNTERS = (
    ("scls:worker_generated_tokens", "generated_tokens", "Tokens generated since it joined."),
    ("scls:worker_busy_seconds", "busy_s", "Seconds spent running batches."),
    (
        "vllm:prefix_cache_queries",
        "prefix_query_tokens",
        "Context tokens looked up in the prefix cache.",
    ),
    ("vllm:prefix_cache_hits", "prefix_hit_tokens", "Context tokens found in the prefix cache."),
)


class EngineStats:
    """A Prometheus collector fed with every StatsSnapshot the gateway receives (``update``).

    The first snapshot is a baseline: workers and batches already in it are not counted as
    joins or slices. Gauges are left out while the stream is stale (``broker_up`` 0).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        model_name: str,
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_name = model_name
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.latest: StatsSnapshot | None = None
        self.latest_at = 0.0
        self.num_snapshots = 0
        self._workers: dict[str, str] = {}  # worker_id -> state in the previous snapshot
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        w = ["worker_id"]
        self._batch = {
            name: Counter(name, doc, w, registry=registry) for name, _, doc in BATCH_COUNTERS
        }
        self._time_ratio = Histogram(
            "scls:batch_time_ratio", "Measured over predicted batch time.", w,
            buckets=RATIO_BUCKETS, registry=registry,
        )  # fmt: skip
        self._peak_ratio = Histogram(
            "scls:batch_peak_ratio", "Measured over predicted peak KV memory of a batch.", w,
            buckets=RATIO_BUCKETS, registry=registry,
        )  # fmt: skip
        self._joins = Counter("scls:worker_joins", "Workers that joined.", w, registry=registry)
        self._losses = Counter(
            "scls:worker_losses", "Workers lost (not drained).", w, registry=registry
        )
        registry.register(self)

    # -- feeding ----------------------------------------------------------------------------

    def update(self, snap: StatsSnapshot) -> None:
        baseline = self.latest is None or snap.uptime_s < self.latest.uptime_s  # (re)started
        if baseline:
            self._workers.clear()
            self._seen.clear()
            self._seen_order.clear()
        for record in snap.batches:
            if record.batch_id not in self._seen:
                self._remember(record.batch_id)
                if not baseline:
                    self._count_batch(record)
        self._follow_workers(snap, baseline)
        self.latest, self.latest_at = snap, self.clock()
        self.num_snapshots += 1

    def _remember(self, batch_id: int) -> None:
        self._seen.add(batch_id)
        self._seen_order.append(batch_id)
        if len(self._seen_order) > MAX_REMEMBERED_BATCHES:
            self._seen.discard(self._seen_order.popleft())

    def _count_batch(self, r: BatchRecord) -> None:
        for name, field, _ in BATCH_COUNTERS:
            value = 1 if field is None else getattr(r, field)
            self._batch[name].labels(r.worker_id).inc(float(value))
        if r.predicted_s > 0:
            self._time_ratio.labels(r.worker_id).observe(r.measured_s / r.predicted_s)
        if r.predicted_peak_bytes > 0:
            ratio = r.measured_peak_bytes / r.predicted_peak_bytes
            self._peak_ratio.labels(r.worker_id).observe(ratio)

    def _follow_workers(self, snap: StatsSnapshot, baseline: bool) -> None:
        now = {w.worker_id: w.state for w in snap.workers}
        if not baseline:
            for worker_id in now.keys() - self._workers.keys():
                self._joins.labels(worker_id).inc()
            for worker_id, state in self._workers.items():
                gone = worker_id not in now or (now[worker_id] == "lost" and state != "lost")
                if gone and state not in ("draining", "lost"):
                    self._losses.labels(worker_id).inc()
        self._workers = now

    # -- what a scrape sees -----------------------------------------------------------------

    def fresh(self) -> StatsSnapshot | None:
        """The newest snapshot, or None when none came within stale_after_s."""
        if self.latest is None or self.clock() - self.latest_at > self.stale_after_s:
            return None
        return self.latest

    def describe(self) -> list[Metric]:
        return []  # metrics come and go with the workers: not checked at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.fresh()
        up = GaugeMetricFamily("scls:broker_up", "1 while the broker's stats stream is fresh.")
        up.add_metric([], 1.0 if snap is not None else 0.0)
        yield up
        if snap is None:
            return
        yield from self._engine_gauges(snap)
        yield from self._worker_metrics(snap)

    def _engine_gauges(self, snap: StatsSnapshot) -> Iterator[Metric]:
        m = [self.model_name]

        def gauge(name: str, doc: str, value: float, labels=("model_name",)) -> Metric:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            family.add_metric(m if labels else [], float(value))
            return family

        used = sum(w.kv_used_bytes for w in snap.workers)
        budget = sum(w.kv_budget_bytes for w in snap.workers)
        yield gauge(
            "vllm:num_requests_running", "Requests in dispatched batches.", snap.num_running
        )
        yield gauge("vllm:num_requests_waiting", "Requests waiting for a batch.", snap.num_waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV cache used over the KV budget, all workers (0 to 1).",
            used / budget if budget else 0.0,
        )
        yield gauge("scls:num_workers", "Workers connected.", snap.num_workers, ())
        yield gauge("scls:draining", "1 while the broker shuts down.", snap.draining, ())
        yield gauge(
            "scls:request_throughput", "Finished requests per second (30 s window).",
            snap.request_throughput, (),
        )  # fmt: skip
        yield gauge(
            "scls:token_throughput", "Generated tokens per second, all workers.",
            snap.token_throughput, (),
        )  # fmt: skip
        for name, value, doc in (
            ("scls:engine_requests_finished", snap.num_finished, "Requests finished (engine)."),
            ("scls:engine_requests_failed", snap.num_failed, "Requests failed after acceptance."),
            ("scls:engine_requests_overloaded", snap.num_rejected, "Submits refused overloaded."),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(value))
            yield counter

    def _worker_metrics(self, snap: StatsSnapshot) -> Iterator[Metric]:
        labels = ["worker_id", "device"]
        state = GaugeMetricFamily("scls:worker_state", "1 for the worker's state.", labels=[*labels, "state"])  # fmt: skip
        queued = GaugeMetricFamily("scls:worker_queued_batches", "Batches dispatched, not started.", labels=labels)  # fmt: skip
        gauges = {n: GaugeMetricFamily(n, doc, labels=labels) for n, _, doc in WORKER_GAUGES}
        counters = {n: CounterMetricFamily(n, doc, labels=labels) for n, _, doc in WORKER_COUNTERS}
        for w in snap.workers:
            key = [w.worker_id, w.device]
            state.add_metric([*key, w.state], 1.0)
            queued.add_metric(key, float(len(w.queued)))
            for name, field, _ in WORKER_GAUGES:
                value = getattr(w, field)
                if value is not None:
                    gauges[name].add_metric(key, float(value))
            for name, field, _ in WORKER_COUNTERS:
                counters[name].add_metric(key, float(getattr(w, field)))
        yield from (state, queued, *gauges.values(), *counters.values())
