"""`run.py simulate`: the benchmark's load and outputs on a simulated cluster (engine/sim): the
same workload, arrival, length-scaling and scheduling flags as `run.py bench`, policies side by
side, results.json with the same metric names, results.md and the plots."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from engine import cli_args
from engine.bench.cli import Results, add_load_flags, add_policy_flags, scaled_load
from engine.cli_base import (
    UsageError,
    at_least_one,
    non_negative_float,
    positive_float,
    positive_int,
    seed,
)

DEFAULT_DEVICE = "h100-80gb:llama-3-8b"
DEFAULT_OUT = "sim-results"


def add_simulate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", default="sls,ils,scls",
                   help="comma-separated, as bench: sls, ils, ils:reserve, ils:optimistic, scls, "
                   "scls:keep, scls:recompute, scls:auto, scls:strict, scls:strict:keep, "
                   "scls:strict:recompute, scls:strict:auto")  # fmt: skip
    p.add_argument("--instances", type=positive_int, default=2, help="simulated workers")
    p.add_argument("--device-model", default=DEFAULT_DEVICE, metavar="NAME|PATH[,...]",
                   help="GPU:MODEL[:tpN] (GPUs a100-80gb, h100-80gb, h200; models llama-2-7b, "
                   "llama-3-8b, llama-2-70b) or a worker's cached profile JSON; several, "
                   "comma-separated, are given to the instances in turn")  # fmt: skip
    p.add_argument("--kv-budget", type=cli_args.positive_bytes, default=None,
                   help="KV budget per instance (default: a GPU's HBM left after the weights; "
                   "a profile: the worker's default, 2GiB)")  # fmt: skip
    p.add_argument("--step-scale", type=positive_float, default=1.0, metavar="FACTOR",
                   help="every instance's steps take FACTOR times the device model's time "
                   "(e.g. a calibration factor for a profile; see docs/SIMULATOR.md)")  # fmt: skip
    p.add_argument("--slow-worker", type=at_least_one, default=1.0, metavar="FACTOR",
                   help="the last instance runs FACTOR times slower, as bench's --slow-worker")  # fmt: skip
    p.add_argument("--announced-model", default=None, metavar="PROFILE.json",
                   help="the time model each instance announces to the broker (default: its "
                   "device model's own), e.g. the profile a real worker announced while its "
                   "steps took other times (calibration; a mis-profiled worker)")  # fmt: skip
    p.add_argument("--slowdown-trace", default=None, metavar="TRACE.json[,...]",
                   help='each instance (in turn) also takes the factor its trace gives for when '
                   'a step begins: {"window_s": S, "factors": [...]} (calibrate writes them from '
                   "a step log: the machine's other work, replayed)")  # fmt: skip
    p.add_argument("--noise", type=non_negative_float, default=0.0, metavar="SIGMA",
                   help="run-to-run noise: each step's time times exp(N(0, SIGMA^2)), seeded")  # fmt: skip
    p.add_argument("--noise-seed", type=seed, default=None, metavar="N",
                   help="seed of the noise alone (default --seed, which also draws synthetic "
                   "workloads): vary it to see a metric's spread on one workload")  # fmt: skip
    p.add_argument("--tick", type=positive_float, default=0.005, metavar="S",
                   help="the broker asks the policy at most every S simulated seconds")  # fmt: skip
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="workers report no time samples: the broker keeps the announced time "
                   "model (by default it refits it on them, at most once a second per "
                   "worker)")  # fmt: skip
    p.add_argument("--stream-interval", type=positive_int, default=1, metavar="STEPS",
                   help="the instances send sampled tokens every STEPS steps, as workers with "
                   "--stream-interval do (fewer messages for the broker; tokens in bursts)")  # fmt: skip
    p.add_argument("--tokenizer", default="embedded",
                   help="model whose tokenizer counts the tokens of text traces (ShareGPT)")  # fmt: skip
    add_load_flags(p)
    add_policy_flags(p)
    p.set_defaults(out=None)
    for action in p._actions:
        if "--out" in action.option_strings:
            action.help = f"results directory (default: {DEFAULT_OUT})"


def _check(args: argparse.Namespace):
    from engine.bench.metrics import MetricsError, parse_goodput
    from engine.bench.runner import BenchError, check_entries
    from engine.sim.devices import DeviceModelError, device_models, load_profile

    if args.policy is not None:
        raise UsageError("simulate compares policies: pass --policies scls,ils,... not --policy")
    _check_ranges(args)
    try:
        entries = check_entries(args.policies.split(","), peers=False)
        goodput_ms = parse_goodput(args.goodput)
        devices = device_models(args.device_model, args.kv_budget)
        _check_count("--device-model", len(devices), args.instances)
        if args.slowdown_trace:
            devices = _with_traces(devices, args.slowdown_trace, args.instances)
        if args.announced_model is not None:
            announced = load_profile(args.announced_model, "--announced-model")
            devices = [replace(d, time_model=announced) for d in devices]
    except (BenchError, MetricsError, DeviceModelError) as exc:
        raise UsageError(str(exc)) from None
    for d in devices:
        _check_budget(d)
    return entries, goodput_ms, devices


def _check_ranges(args: argparse.Namespace) -> None:
    """The ranges the parser's types check, for callers without the parser (calibrate)."""
    checks = (
        ("instances", args.instances >= 1, "at least 1"),
        ("max_duration", math.isfinite(args.max_duration) and args.max_duration > 0, "above 0"),
        ("tick", math.isfinite(args.tick) and args.tick > 0, "above 0"),
        ("noise", math.isfinite(args.noise) and args.noise >= 0, "at least 0"),
        ("step_scale", math.isfinite(args.step_scale) and args.step_scale > 0, "above 0"),
        ("slow_worker", math.isfinite(args.slow_worker) and args.slow_worker >= 1, "at least 1"),
    )
    for name, ok, wanted in checks:
        if not ok:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be {wanted}, got {getattr(args, name)}")


def _check_count(flag: str, num: int, num_instances: int) -> None:
    """More entries than instances would leave some unused: refused (fewer are taken in turn)."""
    if num > num_instances:
        raise UsageError(
            f"{flag} names {num} entries for {num_instances} instance(s): the instances take "
            f"them in turn, so pass at most {num_instances} or raise --instances"
        )


def _with_traces(devices: list, spec: str, num_instances: int) -> list:
    """The device models paired with --slowdown-trace's traces, in turn."""
    from engine.sim.devices import DeviceModelError, SlowdownTrace

    paths = [t.strip() for t in spec.split(",")]
    if not all(paths):
        raise DeviceModelError(
            f"--slowdown-trace {spec!r}: an entry is empty: give TRACE.json[,TRACE.json...]"
        )
    _check_count("--slowdown-trace", len(paths), num_instances)
    traces = [SlowdownTrace.load(path) for path in paths]
    num = max(len(devices), len(traces))  # instances take the pairs in turn
    return [
        replace(devices[i % len(devices)], slowdown_trace=traces[i % len(traces)])
        for i in range(num)
    ]


def _check_budget(device) -> None:
    """A KV budget that cannot hold one request is refused, as `serve` refuses it."""
    from engine.start_checks import check_kv_budget

    try:
        check_kv_budget(device.kv_bytes_per_token, device.kv_budget_bytes, None)
    except UsageError as exc:
        raise UsageError(f"{exc} (--device-model {device.name})") from None


def _tokenize(model: str):
    tokenizer = None

    def tokenize(text: str) -> list[int]:
        nonlocal tokenizer
        if tokenizer is None:
            from engine.models import load_tokenizer

            tokenizer = load_tokenizer(model)
        return list(tokenizer.encode(text, add_special_tokens=False))

    return tokenize


def run_simulate(args: argparse.Namespace) -> int:
    from engine.bench.runner import policy_config
    from engine.bench.workloads import WorkloadError
    from engine.cli_args import scheduler_config
    from engine.sim.cluster import SimItem

    entries, goodput_ms, devices = _check(args)
    # The broker core logs each request and worker as it goes, stamped with wall-clock times
    # that mean nothing here; the results carry every figure (--log-level DEBUG keeps them).
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("engine.requests", "engine.broker.core"):
            logging.getLogger(name).setLevel(logging.WARNING)
    base = scheduler_config(argparse.Namespace(**{**vars(args), "policy": "scls"}))
    baseline = (args.baseline or entries[0]).lower()
    if baseline not in entries:
        raise UsageError(f"--baseline {baseline!r} is not among {', '.join(entries)}")
    max_context_len = min(d.max_context_len for d in devices)
    try:
        workload, arrival, times = scaled_load(
            args, base.max_gen_len, max_context_len, _tokenize(args.tokenizer)
        )
    except (WorkloadError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    hidden = base.max_gen_len if args.lengths == "hidden" else None
    items = [
        SimItem(r.index, r.prompt_len, r.output_len, hidden, r.segments) for r in workload.requests
    ]
    instances = [
        replace(devices[i % len(devices)], slowdown=args.step_scale) for i in range(args.instances)
    ]
    if args.slow_worker > 1 and args.instances > 1:
        instances[-1] = replace(instances[-1], slowdown=args.step_scale * args.slow_worker)
    args.out = args.out or DEFAULT_OUT
    cli_args.out_dir(args.out, "--out")  # said now, not after the first policy ran
    config = {
        "simulated": True,
        "entries": entries,
        "instances": args.instances,
        "device_models": [d.name for d in instances],
        "kv_budget_bytes": [d.kv_budget_bytes for d in instances],
        "scheduler": dataclasses.asdict(base),
        "noise": args.noise,
        "noise_seed": args.seed if args.noise_seed is None else args.noise_seed,
        "step_scale": args.step_scale,
        "slow_worker": args.slow_worker,
        "tick_s": args.tick,
        "refine": args.refine,
        "stream_interval": args.stream_interval,
        "seed": args.seed,
        "repeats": 1,
    }
    print(
        f"simulate: {len(items)} requests of {workload.name} ({arrival.label()}) on "
        f"{', '.join(f'{n} x {d}' for d, n in Counter(config['device_models']).items())}, entries "
        f"{', '.join(entries)}; results in {args.out}",
        flush=True,
    )
    out = Results(args, config, workload, arrival, goodput_ms, baseline)
    for spec in entries:
        sched = policy_config(base, spec)
        out.add(simulate_entry(spec, sched, instances, items, times, arrival.concurrency, args))
    print(out.finish())
    return 0


def simulate_entry(spec, sched, devices, items, times, concurrency, args) -> Any:
    """One policy on the simulated cluster, as a RunResult like bench's."""
    from engine.bench.progress import Progress
    from engine.bench.records import RunResult
    from engine.bench.runner import WORKER_VARIANTS
    from engine.sim.cluster import Simulation

    started = time.perf_counter()
    sim = Simulation(
        sched,
        devices,
        noise=args.noise,
        tick_s=args.tick,
        refine=args.refine,
        seed=args.seed if args.noise_seed is None else args.noise_seed,
        prefix_cache="--no-prefix-cache" not in WORKER_VARIANTS.get(spec, []),
        stream_interval=args.stream_interval,
    )
    progress = Progress(
        f"simulate {spec}", len(items), detail=lambda: f"{sim.clock:.1f} simulated s"
    )
    outcome = sim.run(items, times, concurrency, args.max_duration, progress)
    wall_s = time.perf_counter() - started
    load = outcome.broker_cpu_s / outcome.duration_s if outcome.duration_s > 0 else 0.0
    print(
        f"simulate: {spec}: {outcome.duration_s:.1f} simulated s in {wall_s:.1f} s "
        f"({outcome.num_events:,} events, {outcome.num_rounds:,} broker rounds; broker core "
        f"{outcome.broker_cpu_s:.1f} CPU s, {load:.2f} of a core at the simulated pace)",
        flush=True,
    )
    return RunResult(
        name=spec,
        kind="policy",
        repeat=0,
        config={"scheduler": dataclasses.asdict(sched), "simulated": True},
        requests=outcome.records,
        duration_s=outcome.duration_s,
        wall_s=wall_s,
        timeline=outcome.timeline,
        batches=outcome.batches,
        events=outcome.events,
        workers_start={w: {"busy_s": 0.0, "generated_tokens": 0.0} for w in outcome.workers_end},
        workers_end=outcome.workers_end,
        extra={
            "sim": {
                "events": outcome.num_events,
                "broker_rounds": outcome.num_rounds,
                "broker_cpu_s": outcome.broker_cpu_s,  # measured: differs between runs
            }
        },
        cut_off_s=outcome.cut_off_s,
        stall=outcome.stall,
    )
