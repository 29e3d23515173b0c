"""Builds the StatsSnapshot the broker publishes: queues, memory, throughput, recent requests."""

from __future__ import annotations

from engine import protocol as p
from engine.broker.core import BrokerCore
from engine.broker.requests import RequestState
from engine.broker.workers import WorkerState

WINDOW_S = 30.0  # throughput and latency percentiles over this recent window
MAX_REQUESTS = 200


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def worker_stats(core: BrokerCore, worker: WorkerState, now: float) -> p.WorkerStats:
    hb = worker.heartbeat
    started = worker.started_batches()
    queued = worker.queued_batches()
    running_ids = {rid for b in worker.batches.values() for rid in b.request_ids}
    live_peak = max((b.dispatch.predicted_peak_bytes for b in started), default=0)
    return p.WorkerStats(
        worker_id=worker.worker_id,
        device=worker.ready.device,
        state="draining" if worker.draining else "busy" if worker.batches else "idle",
        queued=[b.info() for b in queued],
        running=[b.info() for b in started],
        num_running_requests=len(running_ids),
        kv_used_bytes=hb.kv_used_bytes if hb else 0,
        kv_parked_bytes=hb.kv_parked_bytes if hb else core.kv.parked_bytes(worker.worker_id),
        kv_predicted_peak_bytes=live_peak + core.kv.parked_bytes(worker.worker_id),
        kv_budget_bytes=worker.kv_budget_bytes,
        mem_used_bytes=hb.mem_used_bytes if hb else None,
        mem_total_bytes=worker.ready.mem_total_bytes,
        util_percent=hb.util_percent if hb else None,
        tokens_per_s=worker.tokens_per_s(now),
        generated_tokens=worker.generated_tokens,
        busy_s=worker.busy_s,
        kv_host_bytes=hb.kv_host_bytes if hb else 0,
        kv_host_budget_bytes=worker.ready.host_kv_budget_bytes,
        prefix_cached_tokens=core.prefix.num_blocks(worker.worker_id)
        * core.prefix.block_tokens(worker.worker_id),
        prefix_query_tokens=worker.prefix_query_tokens,
        prefix_hit_tokens=worker.prefix_hit_tokens,
    )


def snapshot(
    core: BrokerCore,
    now: float,
    started_at: float,
    info: p.EngineInfo | None = None,
    rejected_by_code: dict[str, int] | None = None,
) -> p.StatsSnapshot:
    """``info``: what the engine serves and its limits (the server knows its addresses);
    ``rejected_by_code``: the frames it refused, by error code."""
    cfg = core.cfg
    recent = [r for r in core.done if r.finished_at is not None and r.finished_at >= now - WINDOW_S]
    finished = [r for r in recent if r.state is RequestState.FINISHED]
    window = min(WINDOW_S, max(now - started_at, 1e-9))
    ttfts = [r.first_token_at - r.arrived_at for r in finished if r.first_token_at is not None]
    e2es = [r.finished_at - r.arrived_at for r in finished]
    live = sorted(core.requests.values(), key=lambda r: r.arrived_at, reverse=True)[:MAX_REQUESTS]
    shown = live + list(reversed(core.done))[: MAX_REQUESTS - len(live)]
    num_running = sum(1 for r in core.requests.values() if r.state is RequestState.RUNNING)
    return p.StatsSnapshot(
        uptime_s=now - started_at,
        policy=cfg.policy,
        slice_len=cfg.slice_len,
        max_gen_len=cfg.max_gen_len,
        kv_mode=cfg.kv_mode,
        num_workers=len(core.workers),
        num_waiting=len(core.waiting),
        num_running=num_running,
        num_finished=core.num_finished,
        num_failed=core.num_failed,
        request_throughput=len(finished) / window,
        token_throughput=sum(w.tokens_per_s(now) for w in core.workers.values()),
        ttft_p50_s=_percentile(ttfts, 0.5),
        ttft_p99_s=_percentile(ttfts, 0.99),
        e2e_p50_s=_percentile(e2es, 0.5),
        e2e_p99_s=_percentile(e2es, 0.99),
        workers=[worker_stats(core, w, now) for w in core.workers.values()],
        requests=[r.info(core.kv.holder(r.request_id)) for r in shown],
        events=[p.LogEvent(at_s=t - started_at, level=lv, message=m) for t, lv, m in core.events][
            -50:
        ],
        batches=list(core.batch_records)[-64:],
        num_rejected=core.num_rejected,
        num_preempted=core.num_preempted,
        draining=core.draining,
        info=info,
        num_rejected_by_code=dict(rejected_by_code or {}),
    )
