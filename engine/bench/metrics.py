"""Benchmark metrics, with the names users of ``vllm bench serve`` know, plus the engine's own
(per-worker load, padding, recomputation, slices, memory against prediction and budget).

Definitions (as vLLM's): duration_s runs from the first request's due time to the last
request's end, or to the cut-off of a run cut short (--max-duration, a stall), which is then
marked incomplete and left out of the ratios; TTFT = first token - submission; TPOT = (e2e - TTFT) / (output tokens - 1)
for requests with more than one token; ITL = the gaps between consecutive stream deltas that
carried tokens (one per delta: a delta carrying k tokens counts once); e2el = end - submission.
Percentiles interpolate linearly (numpy). Pure functions: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from engine.bench.records import RequestRecord, RunResult

GOODPUT_KEYS = ("ttft", "tpot", "e2el")
OOM_PARTS = ("worker_failures", "workers_lost", "error_requests", "preemptions")
PERCENTILES = (50, 90, 99)


class MetricsError(ValueError):
    """A metric option that cannot be used; the message says what to pass."""


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:100"]`` -> {"ttft": 500.0, "tpot": 100.0} (milliseconds).
    ``e2e`` is accepted for ``e2el``."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = {"e2e": "e2el"}.get(key.strip().lower(), key.strip().lower())
        try:
            ms = float(value)
        except ValueError:
            ms = float("nan")
        if not sep or key not in GOODPUT_KEYS or not ms > 0 or ms == float("inf"):
            raise MetricsError(
                f"goodput target {item!r}: write KEY:MILLISECONDS with KEY one of ttft, tpot, "
                "e2e (e.g. --goodput ttft:2000 tpot:200)"
            )
        if key in out:
            raise MetricsError(f"--goodput gives {key} twice: give one target per metric")
        out[key] = ms
    return out


def distribution(values_s: Sequence[float], name: str) -> dict[str, float | None]:
    """mean, median, std and percentiles of durations in seconds, reported in milliseconds as
    ``mean_{name}_ms``, ``median_{name}_ms``, ``std_{name}_ms``, ``p50_{name}_ms`` ...;
    None when there are no values."""
    keys = ["mean", "median", "std", *(f"p{q}" for q in PERCENTILES)]
    if not values_s:
        return {f"{k}_{name}_ms": None for k in keys}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
    }
    for q, value in zip(PERCENTILES, np.percentile(ms, PERCENTILES), strict=True):
        out[f"p{q}_{name}_ms"] = float(value)
    return out


def ttft_s(r: RequestRecord) -> float | None:
    if r.first_token_s is None or r.submitted_s is None:
        return None
    return r.first_token_s - r.submitted_s


def e2el_s(r: RequestRecord) -> float | None:
    if r.finished_s is None or r.submitted_s is None:
        return None
    return r.finished_s - r.submitted_s


def tpot_s(r: RequestRecord) -> float | None:
    ttft, e2el = ttft_s(r), e2el_s(r)
    if ttft is None or e2el is None or r.num_output_tokens < 2:
        return None
    return (e2el - ttft) / (r.num_output_tokens - 1)


def itls_s(r: RequestRecord) -> list[float]:
    times = r.chunk_times_s
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def is_good(r: RequestRecord, targets_ms: Mapping[str, float]) -> bool:
    """A finished request that meets every given latency target (vLLM's goodput rule)."""
    if not r.success:
        return False
    values = {"ttft": ttft_s(r), "tpot": tpot_s(r), "e2el": e2el_s(r)}
    for key, limit_ms in targets_ms.items():
        value = values[key]
        if key == "tpot" and value is None:  # one token: no time per output token to miss
            continue
        if value is None or value * 1000.0 > limit_ms:
            return False
    return True


def request_metrics(
    records: Sequence[RequestRecord], duration_s: float, goodput_ms: Mapping[str, float]
) -> dict[str, Any]:
    """Throughput and latency over the successful requests."""
    done = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.num_output_tokens for r in done)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    stalls = [max(itls_s(r), default=0.0) for r in done]
    num_unfinished = sum(r.cut_short for r in records)
    out: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "num_unfinished": num_unfinished,
        "complete": len(done) == len(records),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "request_goodput": per_s(sum(is_good(r, goodput_ms) for r in done)) if goodput_ms else None,
        "goodput_targets_ms": dict(goodput_ms),
        "num_length_mismatches": sum(r.num_output_tokens != r.output_len for r in done),
    }
    out.update(distribution([v for r in done if (v := ttft_s(r)) is not None], "ttft"))
    out.update(distribution([v for r in done if (v := tpot_s(r)) is not None], "tpot"))
    out.update(distribution([v for r in done for v in itls_s(r)], "itl"))
    out.update(distribution([v for r in done if (v := e2el_s(r)) is not None], "e2el"))
    out["max_stall_ms"] = max(stalls) * 1000.0 if stalls else None
    out["mean_max_stall_ms"] = float(np.mean(stalls)) * 1000.0 if stalls else None
    return out


def effective_duration_s(run: RunResult) -> float:
    """The time throughputs divide by: ``run.duration_s``, and for a run cut short never less
    than its cut-off nor than the last moment anything happened in it (a run's unfinished
    requests were in flight until then, whatever its last finished request says)."""
    if all(r.success for r in run.requests):
        return run.duration_s
    seen = [t for r in run.requests for t in (r.submitted_s, r.finished_s, *r.chunk_times_s[-1:])]
    last_s = max((t for t in seen if t is not None), default=0.0)
    return max(run.duration_s, run.cut_off_s or 0.0, last_s)


def imbalance(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(max/mean - 1, coefficient of variation std/mean) of per-worker loads; None when the
    mean is 0 or there are no workers."""
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    if mean <= 0:
        return None, None
    return float(arr.max()) / mean - 1.0, float(arr.std()) / mean


def expected_dispatches(
    policy: str, output_len: int, slice_len: int | None, hidden_length: bool = False
) -> int:
    """Dispatches a request needs when nothing preempts it: one per slice under SCLS, one
    under SLS and ILS (and for peers). With a hidden length, a request whose length is a whole
    number of slices may be dispatched once more before the client's cancel lands."""
    if policy.startswith("scls") and slice_len:
        boundary = hidden_length and output_len % slice_len == 0
        return max(1, math.ceil(output_len / slice_len)) + boundary
    return 1


def sampled_busy_s(run: RunResult) -> dict[str, float]:
    """Seconds each worker was busy (had work dispatched), integrated over the stats timeline:
    a sample's state holds until the next sample."""
    out: dict[str, float] = {}
    for a, b in zip(run.timeline, run.timeline[1:], strict=False):
        for w in a.workers:
            out[w.worker_id] = out.get(w.worker_id, 0.0) + (b.at_s - a.at_s) * w.busy
    return out


def per_worker(run: RunResult) -> dict[str, dict[str, float]]:
    """Per worker during the load: ``busy_s`` (sampled from the timeline, see sampled_busy_s),
    ``dispatch_s`` (the broker's sum of measured dispatch durations: under ILS, dispatches that
    joined one running set overlap, so it can exceed the wall time) and generated tokens."""
    sampled = sampled_busy_s(run)
    out = {}
    for worker_id, end in run.workers_end.items():
        start = run.workers_start.get(worker_id, {})

        def grew(key: str, end=end, start=start) -> float:
            return end.get(key, 0.0) - start.get(key, 0.0)

        out[worker_id] = {
            "busy_s": sampled.get(worker_id, 0.0),
            "dispatch_s": grew("busy_s"),
            "generated_tokens": grew("generated_tokens"),
            # prefix cache: context tokens found there during the load, and held at its end
            "prefix_hit_tokens": grew("prefix_hit_tokens"),
            "prefix_cached_tokens": end.get("prefix_cached_tokens", 0.0),
        }
    return out


def prefix_metrics(run: RunResult) -> dict[str, Any]:
    """``prefix_hit_rate``: prompt tokens served from a prefix cache over all prompt tokens
    (successful requests; engine runs only: peers report none)."""
    done = [r for r in run.requests if r.success]
    prompt_tokens = sum(r.prompt_len for r in done)
    cached = sum(r.cached_tokens for r in done)
    return {
        "prefix_cached_tokens": cached,
        "prefix_hit_rate": cached / prompt_tokens if prompt_tokens else None,
    }


def _sum(batches: Sequence[Mapping[str, Any]], key: str) -> int:
    return int(sum(b.get(key, 0) for b in batches))


def failure_counts(run: RunResult, slice_len: int | None) -> dict[str, int]:
    """What the benchmark counts as OOM-like events: batches a worker failed, workers lost,
    requests that ended in an error, and preemptions (the broker's counter, from the stats
    snapshots; without any snapshot, inferred from each finished request's slice count)."""
    messages = [str(e.get("message", "")) for e in run.events]
    if run.timeline:  # the broker counts them (one engine per run: from zero)
        preemptions = max(s.num_preempted for s in run.timeline)
    else:  # no snapshot: inferred from each finished request's slice count
        preemptions = sum(
            max(
                0,
                r.num_slices
                - expected_dispatches(run.name, r.output_len, slice_len, r.hidden_length),
            )
            for r in run.requests
            if r.success and r.num_slices > 0
        )
    counts = {
        "worker_failures": sum("failed batch" in m for m in messages),
        "workers_lost": sum(" lost (" in m for m in messages),
        "error_requests": sum(r.finish_reason == "error" for r in run.requests),
        "preemptions": preemptions,
    }
    counts["oom_count"] = sum(counts[k] for k in OOM_PARTS)
    return counts


def memory_metrics(run: RunResult) -> dict[str, Any]:
    """Peak KV bytes: measured (batch records and heartbeats) against predicted and budget."""
    batches = run.batches
    budgets = [w.kv_budget_bytes for s in run.timeline for w in s.workers if w.kv_budget_bytes]
    budget = min(budgets) if budgets else None
    used = [w.kv_used_bytes for s in run.timeline for w in s.workers]
    return {
        "kv_budget_bytes": budget,
        "peak_measured_bytes": max((b["measured_peak_bytes"] for b in batches), default=None),
        "peak_predicted_bytes": max((b["predicted_peak_bytes"] for b in batches), default=None),
        "peak_kv_used_bytes": max(used, default=None),
        "num_batches_over_budget": sum(
            budget is not None and b["measured_peak_bytes"] > budget for b in batches
        ),
        "num_batches_over_prediction": sum(
            b["measured_peak_bytes"] > b["predicted_peak_bytes"] for b in batches
        ),
    }


def _excess_tokens(run: RunResult) -> int | None:
    """Tokens the workers generated beyond what the benchmark counted (with hidden lengths the
    cancel at the target length lands a step or two late), from the batch records (the
    broker's per-worker totals drop tokens of cancelled requests); None when records are
    missing."""
    if not run.batches or run.num_batches_missed:
        return None
    generated = sum(int(b.get("generated_tokens", 0)) for b in run.batches)
    return generated - sum(r.num_output_tokens for r in run.requests)


def engine_metrics(run: RunResult, slice_len: int | None) -> dict[str, Any]:
    """Per-worker load and imbalance, token waste, slices, early returns, failures, memory."""
    workers = per_worker(run)
    busy_imbalance, busy_cv = imbalance([w["busy_s"] for w in workers.values()])
    token_imbalance, _ = imbalance([w["generated_tokens"] for w in workers.values()])
    batches = run.batches
    done = [r for r in run.requests if r.success]
    slices = [r.num_slices for r in done if r.num_slices > 0]
    out: dict[str, Any] = {
        "per_worker": workers,
        "load_imbalance": busy_imbalance,
        "busy_cv": busy_cv,
        "token_imbalance": token_imbalance,
        "num_batches": len(batches),
        "num_batches_missed": run.num_batches_missed,
        "prefill_tokens": _sum(batches, "prefill_tokens"),
        "pad_tokens": _sum(batches, "pad_tokens"),
        "invalid_tokens": _sum(batches, "invalid_tokens"),
        "recomputed_tokens": _sum(batches, "recomputed_tokens"),
        "reused_kv_tokens": _sum(batches, "reused_kv_tokens"),
        "early_return_ratio": (
            sum(bool(b["early_return"]) for b in batches) / len(batches) if batches else None
        ),
        "mean_slices_per_request": float(np.mean(slices)) if slices else None,
        "excess_tokens": _excess_tokens(run),
        "max_slices_per_request": max(slices, default=None),
    }
    out.update(failure_counts(run, slice_len))
    out.update(memory_metrics(run))
    out.update(prefix_metrics(run))
    return out


def summarize(
    run: RunResult, goodput_ms: Mapping[str, float], slice_len: int | None
) -> dict[str, Any]:
    """Every metric of one run; a peer's own counters (run.extra["metrics"]) override the
    engine-side ones it has no source for. ``output_tokens_per_cpu_s``: output tokens per CPU
    second of the workers (peers: of the benchmark process), a figure that a shared machine's
    other load disturbs far less than wall-clock throughput."""
    out = request_metrics(run.requests, effective_duration_s(run), goodput_ms)
    out["cut_off_s"] = run.cut_off_s
    out["stall"] = run.stall
    engine = engine_metrics(run, slice_len)
    if run.kind == "endpoint":  # a server seen from outside: only its failed requests are known
        engine = {k: v if k == "error_requests" else None for k, v in engine.items()}
    out.update(engine)
    out.update(run.extra.get("metrics", {}))
    parts = [out[k] for k in OOM_PARTS]  # with a peer's own preemption count
    out["oom_count"] = sum(parts) if all(v is not None for v in parts) else None
    cpu_s = out.get("cpu_s")
    out["output_tokens_per_cpu_s"] = out["total_output_tokens"] / cpu_s if cpu_s else None
    return out


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary from repeats: the mean of every numeric metric (None if any repeat lacks
    it); flags (``complete``) true only if true in every repeat; records (``stall``) from the
    first repeat that has one; other values from the first repeat. One repeat: unchanged."""
    if len(summaries) == 1:
        return dict(summaries[0])
    out: dict[str, Any] = {}
    for key in summaries[0]:
        values = [s.get(key) for s in summaries]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            out[key] = float(np.mean(values))
        elif all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif any(isinstance(v, dict) for v in values):
            out[key] = next(v for v in values if isinstance(v, dict))
        else:
            out[key] = values[0]
    out["num_repeats"] = len(summaries)
    return out


def ratios(
    summaries: Mapping[str, Mapping[str, Any]], baseline: str, keys: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """metric / baseline's metric for each name and key (None where undefined). A run cut
    short is no comparison: its row (every row, if it is the baseline) has None everywhere
    and ``excluded`` says why."""
    if baseline not in summaries:
        raise MetricsError(
            f"baseline {baseline!r} did not run: pick one of {', '.join(summaries)} (--baseline)"
        )
    base = summaries[baseline]
    out: dict[str, dict[str, Any]] = {}
    for name, summary in summaries.items():
        row: dict[str, Any] = {}
        why = incomplete_reason(summary) or (
            f"baseline {baseline} incomplete" if incomplete_reason(base) else None
        )
        if why:
            out[name] = {**dict.fromkeys(keys), "excluded": why}
            continue
        for key in keys:
            value, ref = summary.get(key), base.get(key)
            ok = isinstance(value, int | float) and isinstance(ref, int | float) and ref != 0
            row[key] = float(value) / float(ref) if ok else None
        out[name] = row
    return out


def incomplete_reason(summary: Mapping[str, Any]) -> str | None:
    """ "incomplete: 33 of 48 unfinished, stalled" for a run cut short; None for a complete one
    (a summary without the flag counts as complete)."""
    if summary.get("complete", True):
        return None
    num, unfinished = summary.get("num_requests"), summary.get("num_unfinished")
    failed = (summary.get("failed") or 0) - (unfinished or 0)
    parts = [f"{unfinished:.0f} of {num:.0f} unfinished"] if unfinished else []
    parts += [f"{failed:.0f} failed"] if failed else []
    parts += ["stalled"] if summary.get("stall") else []
    return "incomplete: " + ", ".join(parts)
