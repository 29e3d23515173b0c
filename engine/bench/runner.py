"""Runs one workload side by side: a fresh LocalEngine per policy run (same worker settings),
the peers in this process, then any OpenAI-compatible endpoints over HTTP; repeats are
interleaved (A B C, A B C, ...) so that drifts of a shared machine spread over every entry."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.bench.endpoint import Endpoint, read_api_key, run_endpoint_load
from engine.bench.loadgen import LoadItem, run_load
from engine.bench.peers import PEER_NAMES, PeerSettings, run_peer
from engine.bench.progress import Progress
from engine.bench.records import RunResult, TimelineSample
from engine.cli_args import worker_flags
from engine.config import DEFAULT_KV_BUDGET_BYTES, BrokerConfig, SchedulerConfig, WorkerConfig

log = logging.getLogger(__name__)

ANY_PORT = "tcp://127.0.0.1:*"
POLICY_VARIANTS = {
    "sls": {},
    "ils": {},
    "ils:reserve": {"ils_admission": "reserve"},
    "ils:optimistic": {"ils_admission": "optimistic"},
    "scls": {},
    "scls:keep": {"kv_mode": "keep"},
    "scls:recompute": {"kv_mode": "recompute"},
    "scls:auto": {"kv_mode": "auto"},
    "scls:strict": {"policy": "scls:strict"},
    "scls:strict:keep": {"policy": "scls:strict", "kv_mode": "keep"},
    "scls:strict:recompute": {"policy": "scls:strict", "kv_mode": "recompute"},
    "scls:strict:auto": {"policy": "scls:strict", "kv_mode": "auto"},
    # prefix caching: placement by load alone (the caches on), and the caches off
    "scls:load-placement": {"prefix_placement": False},
    "ils:load-placement": {"prefix_placement": False},
    "scls:no-prefix-cache": {},
    "ils:no-prefix-cache": {},
}
#: Entries whose workers run with extra flags.
WORKER_VARIANTS = {
    "scls:no-prefix-cache": ["--no-prefix-cache"],
    "ils:no-prefix-cache": ["--no-prefix-cache"],
}


class BenchError(ValueError):
    """A benchmark option that cannot be used; the message says what to pass."""


def journal_file(journal_dir: str | None, spec: str, repeat: int) -> str | None:
    """A fresh journal for one engine run (any left by an earlier run is removed first)."""
    if journal_dir is None:
        return None
    path = Path(journal_dir) / f"journal-{spec.replace(':', '-')}-{repeat + 1}.sqlite"
    for suffix in ("", "-wal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return str(path)


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """What every entry of one benchmark shares. ``entries``: policy specs (POLICY_VARIANTS),
    peer names (PEER_NAMES) and the names of ``endpoints``, in run order."""

    entries: tuple[str, ...]
    num_workers: int
    model: str
    dtype: str
    threads_per_worker: int
    kv_budget_bytes: int | None  # per worker; None: the worker's default
    profile: bool
    scheduler: SchedulerConfig
    seed: int = 0
    repeats: int = 1
    max_duration_s: float = 600.0
    slow_worker: float = 1.0  # the last worker of every engine runs this many times slower
    stall_timeout_s: float | None = 60.0  # no token for this long while requests are in flight
    stats_interval_s: float = 0.25
    journal_dir: str | None = None  # each engine run journals into a fresh file here
    step_log_dir: str | None = None  # each engine run's workers log their steps under here
    stream_interval: int = 1  # the workers send sampled tokens every this many steps
    peer_batch_size: int | None = None
    peer_page_size: int = 32
    peer_max_batch_tokens: int = 1024
    endpoints: tuple[Endpoint, ...] = ()
    endpoint_api_key_file: str | None = None  # the path only: results.json records settings
    log_level: str = "WARNING"

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["scheduler"] = dataclasses.asdict(self.scheduler)
        out["kv_budget_bytes_effective"] = self.kv_budget_bytes or DEFAULT_KV_BUDGET_BYTES
        return out


def check_entries(
    entries: Sequence[str], endpoints: Sequence[str] = (), peers: bool = True
) -> tuple[str, ...]:
    """Policy specs and peer names, then endpoint names: each known, and each once.
    ``peers=False`` (simulate): policies alone, and the messages name only --policies."""
    names = tuple(e.strip().lower() for e in entries if e.strip())
    if not peers:
        return _check_policies(names)
    unknown = [n for n in names if n not in POLICY_VARIANTS and n not in PEER_NAMES]
    taken = [n for n in endpoints if n in POLICY_VARIANTS or n in PEER_NAMES]
    if taken:
        raise BenchError(
            f"--endpoint name {', '.join(taken)} is a policy or peer: write OTHER_NAME=URL"
        )
    names += tuple(endpoints)
    if unknown:
        raise BenchError(
            f"unknown policy or peer {', '.join(unknown)}: use {', '.join(POLICY_VARIANTS)} "
            f"(and --peers for {', '.join(PEER_NAMES)})"
        )
    if not names:
        raise BenchError(
            "nothing to run: pass --policies sls,ils,scls, --peers and/or --endpoint URL"
        )
    if len(set(names)) != len(names):
        raise BenchError(f"an entry appears twice in {', '.join(names)}: list each once")
    return names


def _check_policies(names: tuple[str, ...]) -> tuple[str, ...]:
    peers = [n for n in names if n in PEER_NAMES]
    if peers:
        raise BenchError(
            f"{', '.join(peers)} is a transformers peer, which only `run.py bench --peers` runs: "
            "simulate runs policies; drop it from --policies"
        )
    unknown = [n for n in names if n not in POLICY_VARIANTS]
    if unknown:
        raise BenchError(
            f"unknown policy {', '.join(unknown)}: --policies takes {', '.join(POLICY_VARIANTS)}"
        )
    if not names:
        raise BenchError("--policies is empty: pass policies, e.g. --policies sls,ils,scls")
    if len(set(names)) != len(names):
        raise BenchError(f"a policy appears twice in --policies {','.join(names)}: list each once")
    return names


def policy_config(base: SchedulerConfig, spec: str) -> SchedulerConfig:
    """The scheduler config of a policy spec such as "ils:optimistic" or "scls:recompute"."""
    fields = {"policy": spec.split(":")[0], **POLICY_VARIANTS[spec]}
    return replace(base, **fields)  # type: ignore[arg-type]


def run_step_log_dir(settings: BenchSettings, spec: str, repeat: int) -> str | None:
    """Where one engine run's workers log their steps (``--step-log``): a folder per run."""
    if settings.step_log_dir is None:
        return None
    return str(Path(settings.step_log_dir) / f"{spec.replace(':', '-')}-{repeat + 1}")


def worker_args(settings: BenchSettings, spec: str = "", repeat: int = 0) -> list[str]:
    worker = WorkerConfig(
        model=settings.model,
        dtype=settings.dtype,
        kv_budget_bytes=settings.kv_budget_bytes,
        num_threads=settings.threads_per_worker,
        profile=settings.profile,
        step_log=run_step_log_dir(settings, spec, repeat),
        stream_interval=settings.stream_interval,
    )
    extra = WORKER_VARIANTS.get(spec, [])
    return [*worker_flags(worker), *extra, "--log-level", settings.log_level]


def run_policy(
    settings: BenchSettings,
    spec: str,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None,
    repeat: int,
) -> RunResult:
    """A fresh engine with this policy, the whole load, and everything it recorded."""
    from engine.launcher import LocalEngine

    sched = policy_config(settings.scheduler, spec)
    cfg = BrokerConfig(
        client_addr=ANY_PORT,
        worker_addr=ANY_PORT,
        stats_addr=ANY_PORT,
        model=settings.model,
        stats_interval_s=settings.stats_interval_s,
        scheduler=sched,
        journal_path=journal_file(settings.journal_dir, spec, repeat),
    )
    started = time.monotonic()
    progress = Progress(f"{spec} #{repeat + 1}", len(items))
    slow = settings.slow_worker > 1 and settings.num_workers > 1
    with LocalEngine(
        cfg, settings.num_workers - slow, worker_args(settings, spec, repeat)
    ) as engine:
        if slow:
            engine.add_worker(["--slowdown", str(settings.slow_worker)])  # its steps logged too
            engine.wait_for_workers(settings.num_workers)
        cpu_before, load_before = workers_cpu_s(engine.procs), os.getloadavg()[0]
        outcome = asyncio.run(
            run_load(
                engine.client_addr, engine.stats_addr, items, send_times, concurrency,
                settings.max_duration_s, tag=f"{spec.replace(':', '-')}-{repeat}", progress=progress,
                stall_timeout_s=settings.stall_timeout_s,
            )
        )  # fmt: skip
        cpu_s = workers_cpu_s(engine.procs) - cpu_before
    return RunResult(
        name=spec,
        kind="policy",
        repeat=repeat,
        config={
            "scheduler": dataclasses.asdict(sched),
            "worker_args": worker_args(settings, spec, repeat),
        },
        requests=outcome.records,
        duration_s=outcome.duration_s,
        wall_s=time.monotonic() - started,
        timeline=outcome.timeline,
        batches=outcome.batches,
        num_batches_missed=outcome.num_batches_missed,
        events=outcome.events,
        workers_start=outcome.workers_start,
        workers_end=outcome.workers_end,
        extra={"metrics": {"cpu_s": cpu_s, "loadavg_1m": (load_before + os.getloadavg()[0]) / 2}},
        cut_off_s=outcome.cut_off_s,
        stall=engine_stall(outcome.stall, outcome.timeline),
    )


def engine_stall(
    stall: dict[str, Any] | None, timeline: Sequence[TimelineSample]
) -> dict[str, Any] | None:
    """The load generator's stall report (loadgen.stall_report) with the broker's state when
    it was detected: requests waiting and running, and per worker its state and KV used,
    parked and budget."""
    if stall is None:
        return None
    at_s = stall["detected_s"]
    sample = next((t for t in timeline if t.at_s >= at_s), timeline[-1] if timeline else None)
    if sample is None:
        return {**stall, "engine": {}}
    workers = [dataclasses.asdict(w) for w in sample.workers]
    state = {"num_waiting": sample.num_waiting, "num_running": sample.num_running}
    kv = ", ".join(f"{w['kv_used_bytes']:,} of {w['kv_budget_bytes']:,} B" for w in workers)
    reason = stall["reason"] + (
        f"; broker: {sample.num_waiting} waiting, {sample.num_running} running, "
        + (f"KV {kv}" if workers else "no worker")
    )
    return {**stall, "reason": reason, "engine": {**state, "workers": workers}}


def workers_cpu_s(procs: Sequence[Any]) -> float:
    """User + system CPU seconds used so far by these worker processes (0 for one that ended)."""
    import psutil

    total = 0.0
    for proc in procs:
        try:
            times = psutil.Process(proc.pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def peer_settings(settings: BenchSettings) -> PeerSettings:
    per_worker = settings.kv_budget_bytes or DEFAULT_KV_BUDGET_BYTES
    return PeerSettings(
        model=settings.model,
        dtype=settings.dtype,
        num_threads=settings.num_workers * settings.threads_per_worker,
        kv_budget_bytes=settings.num_workers * per_worker,
        batch_size=settings.peer_batch_size,
        page_size=settings.peer_page_size,
        max_batch_tokens=settings.peer_max_batch_tokens,
        max_batch_size=settings.scheduler.max_batch_size,
        max_duration_s=settings.max_duration_s,
        stall_timeout_s=settings.stall_timeout_s,
    )


def run_peer_entry(
    settings: BenchSettings,
    name: str,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None,
    repeat: int,
) -> RunResult:
    started = time.monotonic()
    peer = peer_settings(settings)
    progress = Progress(f"{name} #{repeat + 1}", len(items))
    load_before = os.getloadavg()[0]
    outcome = run_peer(name, peer, items, send_times, concurrency, progress)
    outcome.extra.setdefault("metrics", {})["loadavg_1m"] = (load_before + os.getloadavg()[0]) / 2
    config = {"peer": dataclasses.asdict(peer)}
    return _result(name, "peer", repeat, config, outcome, started, outcome.extra)


def _result(
    name: str, kind: str, repeat: int, config: dict, outcome: Any, started: float, extra: dict
) -> RunResult:
    """A run without an engine of the bench's own (a peer or an endpoint): ``outcome`` has
    records, duration_s, cut_off_s and stall."""
    return RunResult(
        name=name,
        kind=kind,
        repeat=repeat,
        config=config,
        requests=outcome.records,
        duration_s=outcome.duration_s,
        wall_s=time.monotonic() - started,
        extra=extra,
        cut_off_s=outcome.cut_off_s,
        stall=outcome.stall,
    )


def run_endpoint_entry(
    settings: BenchSettings,
    name: str,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None,
    repeat: int,
    prompt_texts: Sequence[str] | None = None,
) -> RunResult:
    """The load sent to an OpenAI-compatible server (resolved by endpoint.resolve_all)."""
    endpoint = next(e for e in settings.endpoints if e.name == name)
    api_key = read_api_key(settings.endpoint_api_key_file)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    tag = f"{name}-{repeat}-{os.urandom(3).hex()}"  # a server may refuse a live id twice
    outcome = asyncio.run(
        run_endpoint_load(
            endpoint, api_key, items, prompt_texts, send_times, concurrency,
            settings.max_duration_s, settings.stall_timeout_s, tag,
            Progress(f"{name} #{repeat + 1}", len(items)),
        )
    )  # fmt: skip
    config = {"endpoint": dataclasses.asdict(endpoint)}
    extra = {"metrics": {"loadavg_1m": (load_before + os.getloadavg()[0]) / 2}}
    return _result(name, "endpoint", repeat, config, outcome, started, extra)


def report_failures(result: RunResult, max_shown: int = 3) -> None:
    """Log how many requests of a run did not finish, and their first distinct errors."""
    failed = [r for r in result.requests if not r.success]
    if not failed:
        return
    reasons = list(
        dict.fromkeys(
            f"{r.finish_reason}: {r.error}" if r.error else r.finish_reason for r in failed
        )
    )
    log.warning(
        "%s: %d of %d requests did not finish (the run is reported as incomplete, over the "
        "time to its cut-off, and left out of the ratios); %s%s",
        result.name,
        len(failed),
        len(result.requests),
        " | ".join(reasons[:max_shown]),
        f"; stalled: {result.stall['reason']}" if result.stall else "",
    )


def run_all(
    settings: BenchSettings,
    items: Sequence[LoadItem],
    send_times: Sequence[float] | None,
    concurrency: int | None,
    on_result: Callable[[RunResult], None] | None = None,
    prompt_texts: Sequence[str] | None = None,
) -> list[RunResult]:
    """Every entry, ``repeats`` times, interleaved; ``on_result`` sees each run as it ends.
    ``prompt_texts``: the items' prompts decoded, for endpoints that take text."""
    runners: dict[str, Callable[..., RunResult]] = dict.fromkeys(PEER_NAMES, run_peer_entry)
    for endpoint in settings.endpoints:
        runners[endpoint.name] = functools.partial(run_endpoint_entry, prompt_texts=prompt_texts)
    results = []
    for repeat in range(settings.repeats):
        for name in settings.entries:
            run = runners.get(name, run_policy)
            result = run(settings, name, items, send_times, concurrency, repeat)
            report_failures(result)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results
