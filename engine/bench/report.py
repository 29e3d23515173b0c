"""Benchmark results as files: one JSON document (config, workload and scaling, per-request
records, a summary per policy or peer keyed by name, ratios against the baseline) and a
Markdown report with the same figures as tables."""

from __future__ import annotations

import datetime
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from engine.bench import metrics
from engine.bench.records import RunResult

SCHEMA_VERSION = 1

#: (metric, column title, format) of the two Markdown tables.
SERVING_COLUMNS = (
    ("completed", "done", "{:.0f}"),
    ("request_throughput", "req/s", "{:.3f}"),
    ("output_throughput", "out tok/s", "{:.1f}"),
    ("total_token_throughput", "total tok/s", "{:.1f}"),
    ("request_goodput", "goodput req/s", "{:.3f}"),
    ("mean_ttft_ms", "mean TTFT ms", "{:.0f}"),
    ("p99_ttft_ms", "p99 TTFT ms", "{:.0f}"),
    ("mean_tpot_ms", "mean TPOT ms", "{:.0f}"),
    ("p99_tpot_ms", "p99 TPOT ms", "{:.0f}"),
    ("mean_itl_ms", "mean ITL ms", "{:.0f}"),
    ("p50_e2el_ms", "p50 e2e ms", "{:.0f}"),
    ("p99_e2el_ms", "p99 e2e ms", "{:.0f}"),
    ("max_stall_ms", "max stall ms", "{:.0f}"),
    ("output_tokens_per_cpu_s", "out tok/CPU s", "{:.1f}"),
    ("loadavg_1m", "load avg", "{:.1f}"),
)
ENGINE_COLUMNS = (
    ("load_imbalance", "imbalance", "{:.1%}"),
    ("busy_cv", "busy CV", "{:.1%}"),
    ("prefix_hit_rate", "prefix hits", "{:.1%}"),
    ("mean_slices_per_request", "slices/req", "{:.2f}"),
    ("early_return_ratio", "early ret.", "{:.0%}"),
    ("pad_tokens", "pad tok", "{:.0f}"),
    ("invalid_tokens", "invalid tok", "{:.0f}"),
    ("recomputed_tokens", "recomputed tok", "{:.0f}"),
    ("excess_tokens", "excess tok", "{:.0f}"),
    ("oom_count", "OOM", "{:.0f}"),
    ("peak_measured_bytes", "peak KV MiB", "mib"),
    ("peak_predicted_bytes", "predicted MiB", "mib"),
    ("kv_budget_bytes", "budget MiB", "mib"),
)
RATIO_KEYS = (
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "mean_ttft_ms",
    "mean_tpot_ms",
    "p99_e2el_ms",
    "output_tokens_per_cpu_s",
)

NOTES = [
    "Times are taken in the benchmark process with time.monotonic() on each stream delta.",
    "duration_s: from the first request's due time to the last request's end; throughputs "
    "divide finished requests and their tokens by it. A run with unfinished requests (cut off "
    "at --max-duration, or ended after --stall-timeout seconds without a token while requests "
    "were in flight) divides by the time to its cut-off (cut_off_s), is marked incomplete "
    "(complete: false, num_unfinished; '(incomplete)' after its name in every table) and is "
    "left out of the ratios.",
    "ITL: one value per stream delta that carried tokens (a delta with k tokens counts once).",
    "busy_s per worker: integrated from the broker's stats snapshots (busy = work dispatched); "
    "dispatch_s: the broker's sum of measured dispatch durations (overlaps under ILS).",
    "load_imbalance = max/mean - 1 of per-worker busy_s; busy_cv = std/mean.",
    "oom_count = worker_failures (batches a worker failed) + workers_lost + error_requests + "
    "preemptions (the broker's num_preempted: requests a worker's memory guard sent back; a "
    "peer's own count).",
    "output_tokens_per_cpu_s: output tokens per CPU second (user + system) of the worker "
    "processes during the load (peers: of the benchmark process); loadavg_1m: the machine's "
    "1-minute load average around the run (2 cores: above 2, other work competed).",
    "lengths known: max_tokens is each request's output length (as vLLM's benchmark), so a "
    "policy that reserves max_tokens (ILS reserve) knows lengths exactly; hidden: max_tokens is "
    "max_gen_len and the client cancels at the output length; excess_tokens counts what the "
    "workers generated past it before the cancel landed.",
    "Peak KV: measured_peak_bytes and predicted_peak_bytes of the engine's batch records; "
    "peak_kv_used_bytes from the workers' heartbeats.",
    "Endpoint entries (--endpoint): streamed /v1/completions over HTTP; a stream chunk with "
    "text counts as one token when it arrives (TTFT, ITL), the stream's usage corrects the "
    "total; engine metrics (workers, slices, KV, CPU) are n/a, as the server is seen from "
    "outside.",
]


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _builtins(value: Any) -> Any:
    """Dataclasses and structs as JSON's dicts and lists, NaN and infinities as None: through
    msgspec's JSON, some 25 times faster than ``dataclasses.asdict`` and a walk (a run's
    records hold every token's arrival time)."""
    return msgspec.json.decode(msgspec.json.encode(value, enc_hook=_enc_hook))


def run_document(run: RunResult, summary: Mapping[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = _builtins(run)
    doc["summary"] = _builtins(dict(summary))
    return doc


def build_document(
    *,
    command: str,
    config: Mapping[str, Any],
    workload: Mapping[str, Any],
    arrival: Mapping[str, Any],
    goodput_ms: Mapping[str, float],
    baseline: str,
    results: Sequence[RunResult],
    slice_len: int | None,
) -> dict[str, Any]:
    """The whole JSON document; ``summary[name]`` averages that name's repeats."""
    per_run = [metrics.summarize(r, goodput_ms, slice_len) for r in results]
    names = list(dict.fromkeys(r.name for r in results))
    summary = {
        name: metrics.aggregate(
            [s for r, s in zip(results, per_run, strict=True) if r.name == name]
        )
        for name in names
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for result, run_summary in zip(results, per_run, strict=True):
        runs[result.name].append(run_document(result, run_summary))
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "config": dict(config),
        "workload": dict(workload),
        "arrival": dict(arrival),
        "goodput_targets_ms": dict(goodput_ms),
        "baseline": baseline,
        "summary": summary,
        "ratios": metrics.ratios(summary, baseline, RATIO_KEYS),
        "notes": NOTES,
    }
    doc = _builtins(doc)
    doc["runs"] = runs  # already builtins
    return doc


def write_json(doc: Mapping[str, Any], path: Path) -> None:
    text = msgspec.json.format(msgspec.json.encode(doc, enc_hook=_enc_hook), indent=1)
    path.write_bytes(text + b"\n")


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if fmt == "mib":
        return f"{value / 2**20:.1f}"
    return fmt.format(value)


def row_name(name: str, values: Mapping[str, Any]) -> str:
    """The name cell: a run cut short says so wherever it appears."""
    return f"{name} (incomplete)" if metrics.incomplete_reason(values) else name


def table(summary: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table: one row per name, one column per metric; the "done" cell of a run cut
    short reads "15 of 48"."""
    lines = [
        "| name | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, values in summary.items():
        cells = [_cell(values.get(key), fmt) for key, _, fmt in columns]
        if metrics.incomplete_reason(values):
            cells = [
                f"{cell} of {values.get('num_requests', 0):.0f}" if key == "completed" else cell
                for cell, (key, _, _) in zip(cells, columns, strict=True)
            ]
        lines.append(f"| {row_name(name, values)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(ratios: Mapping[str, Mapping[str, Any]], baseline: str) -> str:
    """Ratios against the baseline; a row left out (a run cut short) says why in each cell."""
    lines = [
        "| name | " + " | ".join(f"{k} / {baseline}" for k in RATIO_KEYS) + " |",
        "|---|" + "---:|" * len(RATIO_KEYS),
    ]
    for name, row in ratios.items():
        if row.get("excluded"):
            cells = [f"excluded ({row['excluded']})"] + ["-"] * (len(RATIO_KEYS) - 1)
        else:
            cells = [_cell(row.get(k), "{:.2f}x") for k in RATIO_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cut_short_lines(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One bullet per run cut short or stalled: what was left, where it was cut, and why."""
    lines = []
    for name, values in summary.items():
        why, stall = metrics.incomplete_reason(values), values.get("stall")
        if not why and not stall:
            continue
        text = f"- {name}: {why or 'complete, but stalled'}"
        if values.get("cut_off_s") is not None:
            text += f"; cut off at {values['cut_off_s']:.1f} s (throughputs divide by it)"
        if stall:
            text += f"; {stall.get('reason', 'no progress')}"
        lines.append(text)
    return lines


def broker_load_lines(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """A simulation's broker load: the CPU seconds the real broker core took per simulated
    second, for each run that measured them (simulated runs do)."""
    lines = []
    for name, name_runs in runs.items():
        for run in name_runs:
            cpu_s = run.get("extra", {}).get("sim", {}).get("broker_cpu_s")
            if cpu_s is None or not run.get("duration_s"):
                continue
            lines.append(
                f"| {name} | {cpu_s:.2f} | {run['duration_s']:.1f} | "
                f"{cpu_s / run['duration_s']:.3f} |"
            )
    if not lines:
        return []
    return [
        "## The broker at this pace",
        "",
        "CPU seconds this machine spent in the broker core (intake, planning rounds, worker "
        "messages) per simulated second: a lower bound on the cores one real broker process "
        "would need (it also pays for sockets, msgpack, detokenizing and its journal). Above "
        "1.0, one broker on this CPU could not keep up with the simulated cluster, and the "
        "figures above assume a faster one. Measured, so it varies from run to run.",
        "",
        "| run | broker core CPU s | simulated s | cores of this CPU |",
        "|---|---:|---:|---:|",
        *lines,
        "",
    ]


def _workload_lines(workload: Mapping[str, Any], arrival: Mapping[str, Any]) -> list[str]:
    desc = workload.get("description", {})
    scaling = desc.get("scaling", {})
    prompt, output = desc.get("prompt_len", {}), desc.get("output_len", {})
    lines = [
        f"- workload: `{workload.get('name')}`, {_count(desc.get('num_requests'), 'request')}, "
        f"arrival {json.dumps(dict(arrival))}, lengths {workload.get('lengths', 'known')} to "
        "the engine",
        f"- prompt tokens after scaling: mean {prompt.get('mean', 0):.0f}, p50 "
        f"{prompt.get('p50', 0):.0f}, p99 {prompt.get('p99', 0):.0f}, max {prompt.get('max', 0):.0f}; "
        f"output tokens: mean {output.get('mean', 0):.0f}, p50 {output.get('p50', 0):.0f}, "
        f"p99 {output.get('p99', 0):.0f}, max {output.get('max', 0):.0f}",
    ]
    if scaling:
        lines.append(
            f"- scaling: prompt / {scaling.get('prompt_divisor')}, output / "
            f"{scaling.get('output_divisor')}, {_clip('prompt', scaling)}, "
            f"{_clip('output', scaling)}, context at most {scaling.get('max_total_len')}"
        )
    prefix = desc.get("prefix")
    if prefix:
        lines.append(
            f"- shared prefixes: an infinite prefix cache would serve "
            f"{prefix['ideal_hit_rate']:.1%} of the {prefix['prompt_tokens']} prompt tokens "
            f"(blocks of {prefix['block_tokens']}; the ideal `prefix_hit_rate`)"
        )
    if desc.get("attribution"):
        lines.append(f"- data: {desc['attribution']}")
    return lines


def _count(num: Any, noun: str) -> str:
    """``1 request``, ``2 requests``, ``? requests`` (unknown)."""
    if num is None:
        return f"? {noun}s"
    return f"{num} {noun}" if num == 1 else f"{num} {noun}s"


def _clip(kind: str, scaling: Mapping[str, Any]) -> str:
    """``prompt clipped to 512 (3 clipped)``; without a maximum, what the context clipped."""
    limit, num = scaling.get(f"max_{kind}_len"), scaling.get(f"num_{kind}s_clipped")
    if limit is None:
        return (
            f"{kind} clipped to fit the context ({num} clipped)" if num else f"{kind} not clipped"
        )
    return f"{kind} clipped to {limit} ({num} clipped)"


def _setup_lines(cfg: Mapping[str, Any]) -> list[str]:
    """The engines' settings (when an engine or peer ran) and each endpoint's."""
    sched = cfg.get("scheduler", {})
    endpoints = cfg.get("endpoints") or []
    lines = []
    if cfg.get("simulated"):
        names = ", ".join(f"{n} x {d}" for d, n in Counter(cfg["device_models"]).items())
        lines.append(
            f"- **simulated** (engine/sim: the real broker core and policies, simulated "
            f"workers): {names}; KV budget {min(cfg['kv_budget_bytes']) / 2**30:.1f} GiB or more "
            f"per instance; step-time noise {cfg.get('noise')}; slice {sched.get('slice_len')}, "
            f"max_gen_len {sched.get('max_gen_len')}, kv_mode {sched.get('kv_mode')}, "
            f"ils_admission {sched.get('ils_admission')}"
        )
    elif len(cfg.get("entries") or ()) > len(endpoints):
        lines.append(
            f"- {_count(cfg.get('num_workers'), 'worker')} x {cfg.get('threads_per_worker')} torch "
            f"thread(s), model `{cfg.get('model')}` ({cfg.get('dtype')}), KV budget "
            f"{cfg.get('kv_budget_bytes_effective', 0) / 2**20:.0f} MiB per worker; slice "
            f"{sched.get('slice_len')}, max_gen_len {sched.get('max_gen_len')}, kv_mode "
            f"{sched.get('kv_mode')}, ils_admission {sched.get('ils_admission')}"
        )
    for ep in endpoints:
        control = " + ".join(ep.get("length_control") or ()) or "nothing (it may stop early)"
        lines.append(
            f"- endpoint `{ep.get('name')}`: {ep.get('url')}, model `{ep.get('model')}`, "
            f"prompts as {str(ep.get('prompt')).replace('_', ' ')} made with the tokenizer of "
            f"`{cfg.get('model')}`, lengths forced with {control}"
            + ("" if ep.get("usage") else ", no usage in the stream: tokens counted by chunks")
        )
    lines.append(f"- seed {cfg.get('seed')}, {cfg.get('repeats')} repeat(s)")
    return lines


def markdown(doc: Mapping[str, Any]) -> str:
    """The Markdown report of a document made by build_document."""
    cfg = doc["config"]
    head = [
        "# Simulation results" if cfg.get("simulated") else "# Benchmark results",
        "",
        f"`{doc['command']}`",
        "",
        *_setup_lines(cfg),
        *_workload_lines(doc["workload"], doc["arrival"]),
    ]
    if doc.get("goodput_targets_ms"):
        head.append(f"- goodput targets (ms): {json.dumps(doc['goodput_targets_ms'])}")
    body = [
        "",
        "## Serving",
        "",
        table(doc["summary"], SERVING_COLUMNS),
        "",
        "## Engine",
        "",
        table(doc["summary"], ENGINE_COLUMNS),
        "",
        f"## Against {doc['baseline']}",
        "",
        ratio_table(doc["ratios"], doc["baseline"]),
        "",
    ]
    body += broker_load_lines(doc.get("runs", {}))
    cut = cut_short_lines(doc["summary"])
    if cut:
        body += ["## Cut short or stalled", "", *cut, ""]
    body += [
        "## Definitions",
        "",
        *[f"- {note}" for note in doc.get("notes", [])],
        "",
    ]
    return "\n".join(head + body)
