"""`run.py bench`: flags, and the steps of one benchmark (workload, prompts, arrivals, runs,
results files). ``bench_main(argv)`` runs it from Python (examples/compare_policies.py)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from engine import cli_args
from engine.cli_base import (
    UsageError,
    at_least_one,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
)

log = logging.getLogger(__name__)

DEFAULT_WORKLOAD = "synthetic:prompt=uniform:24:56,output=lognormal:80:0.8"


def add_bench_parser(p: argparse.ArgumentParser) -> None:
    """The flags of ``run.py bench`` (plus the scheduling and worker flags of ``serve``)."""
    p.add_argument("--policies", default=None, help="comma-separated: sls, ils, "
                   "ils:reserve, ils:optimistic, scls, scls:keep, scls:recompute, scls:auto, "
                   "scls:strict, scls:strict:keep, scls:strict:recompute, scls:strict:auto, "
                   "scls:load-placement, ils:load-placement (prefix caches on, placed by load "
                   "alone), scls:no-prefix-cache, ils:no-prefix-cache "
                   "(default sls,ils,scls; none with --endpoint)")  # fmt: skip
    p.add_argument("--peers", nargs="?", const="hf_generate,hf_generate_batch", default="",
                   help="also run transformers peers in-process (default both: "
                   "hf_generate,hf_generate_batch)")  # fmt: skip
    g = p.add_argument_group("OpenAI-compatible endpoints")
    g.add_argument("--endpoint", action="append", default=[], metavar="[NAME=]URL",
                   help="also drive this server's /v1/completions (streamed) with the same load: "
                   "its OpenAI base URL, e.g. http://127.0.0.1:8000/v1; repeatable")  # fmt: skip
    # Not --model: in bench that already names the engine's model, whose tokenizer also makes
    # the prompts; this is only the name a server wants in each request's "model" field.
    g.add_argument("--endpoint-model", default=None, metavar="NAME",
                   help="the model name sent to the endpoints (default: the only one GET "
                   "URL/models lists); prompts are made with --model's tokenizer")  # fmt: skip
    g.add_argument("--endpoint-api-key-file", type=Path, default=None, metavar="FILE",
                   help="a bearer key for the endpoints (first line; kept out of the process "
                   "list and the results)")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=2, help="workers of each engine")
    add_load_flags(p)
    p.add_argument(
        "--repeats", type=positive_int, default=1, help="runs of each entry, interleaved"
    )
    p.add_argument("--stall-timeout", type=non_negative_float, default=60.0, metavar="S",
                   help="a run in which no request received a token for S seconds while some "
                   "were in flight stops there and is reported as stalled, with why (0: never)")  # fmt: skip
    p.add_argument("--slow-worker", type=at_least_one, default=1.0, metavar="FACTOR",
                   help="the last worker of every engine runs FACTOR times slower (each forward "
                   "pass takes that much longer: a slower device beside faster ones)")  # fmt: skip
    g = p.add_argument_group("peers")
    g.add_argument("--peer-batch-size", type=positive_int, default=None,
                   help="hf_generate batch size (default: the most whose worst case fits the "
                   "workers' KV budgets together)")  # fmt: skip
    g.add_argument("--peer-page-size", type=positive_int, default=32,
                   help="hf_generate_batch tokens per KV page")  # fmt: skip
    g.add_argument(
        "--peer-max-batch-tokens", type=positive_int, default=1024,
        help="hf_generate_batch tokens per forward (its default, 8192, sizes attention masks "
        "for the whole cache and exhausts a CPU's memory)",
    )  # fmt: skip
    p.add_argument(
        "--stats-interval", type=positive_float, default=0.25, help="seconds between snapshots"
    )
    p.add_argument(
        "--journal",
        metavar="DIR",
        default=None,
        help="each engine run keeps a request journal, a fresh file in DIR (measures its cost)",
    )
    add_policy_flags(p)
    cli_args.add_worker_flags(p)


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    """The scheduling flags of ``serve``, with --policy hidden: policies are compared, given
    by --policies (a --policy is refused with what to pass instead)."""
    cli_args.add_scheduler_flags(p)
    p.set_defaults(policy=None)
    for action in p._actions:
        if "--policy" in action.option_strings:
            action.help = argparse.SUPPRESS


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """What load to send and what to write (``bench`` and ``simulate`` share them)."""
    p.add_argument("--workload", default=DEFAULT_WORKLOAD,
                   help="KIND:PATH (azure, burstgpt, mooncake, sharegpt, sharegpt-chat: every "
                   "turn, each prompt the conversation so far) or synthetic:SPEC "
                   "(see docs/BENCHMARKS.md)")  # fmt: skip
    p.add_argument("--arrival", default=None,
                   help="offline | poisson:RATE | gamma:RATE:BURSTINESS | trace[:SPEED] | "
                   "closed:CONCURRENCY (default: trace for traces with timestamps, else offline)")  # fmt: skip
    p.add_argument("--num-requests", type=positive_int, default=64, help="requests to send")
    p.add_argument(
        "--trace-offset", type=non_negative_int, default=0, help="first trace row to replay"
    )
    p.add_argument("--sample-conversations", type=float, default=None, metavar="FRACTION",
                   help="mooncake: keep this fraction of the trace's conversations (drawn with "
                   "--seed), every turn of each, before --trace-offset and --num-requests")  # fmt: skip
    p.add_argument(
        "--seed", type=seed, default=0, help="draws synthetic lengths, arrivals and prompts"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    p.add_argument(
        "--baseline", default=None, help="entry the ratios compare with (default: first)"
    )
    p.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="latency targets for goodput, e.g. ttft:2000 tpot:200 e2e:30000")  # fmt: skip
    p.add_argument("--max-duration", type=positive_float, default=600.0,
                   help="seconds each run may take from its first request; the rest is cancelled")  # fmt: skip
    g = p.add_argument_group("length scaling")
    g.add_argument("--prompt-divisor", type=positive_float, default=1.0,
                   help="divide prompt lengths")  # fmt: skip
    g.add_argument("--output-divisor", type=positive_float, default=1.0,
                   help="divide output lengths")  # fmt: skip
    g.add_argument("--max-prompt-len", type=positive_int, default=None,
                   help="clip prompts (tokens; default: the model's context)")  # fmt: skip
    g.add_argument("--max-output-len", type=positive_int, default=None,
                   help="clip outputs (tokens; default and at most --max-gen-len)")  # fmt: skip
    g.add_argument("--min-output-len", type=positive_int, default=1,
                   help="lengthen shorter outputs to this (tokens)")  # fmt: skip
    p.add_argument(
        "--lengths", choices=["known", "hidden"], default="known",
        help="known: max_tokens = the output length (as vLLM's benchmark; ILS reserve then "
        "reserves exactly); hidden: max_tokens = --max-gen-len and the client cancels at the "
        "output length, so no scheduler knows lengths in advance",
    )  # fmt: skip
    p.add_argument("--no-plots", action="store_true")


def _settings(args: argparse.Namespace):
    from engine.bench.endpoint import parse_endpoints
    from engine.bench.runner import BenchError, BenchSettings, check_entries

    if args.policy is not None:
        raise BenchError(
            "bench compares policies: pass --policies scls,ils,... instead of --policy"
        )
    if args.workers < 1 or args.repeats < 1 or args.max_duration <= 0:
        raise BenchError("--workers and --repeats must be at least 1, --max-duration above 0")
    if not args.slow_worker >= 1.0:
        raise BenchError(f"--slow-worker must be at least 1 (got {args.slow_worker})")
    endpoints = parse_endpoints(args.endpoint)
    if endpoints and args.lengths == "hidden":
        raise BenchError(
            "--lengths hidden cancels each request at its length, which needs every stream "
            "chunk's token count; OpenAI streams carry text only: use --lengths known with "
            "--endpoint"
        )
    policies = args.policies if args.policies is not None else "" if endpoints else "sls,ils,scls"
    entries = check_entries(
        [*policies.split(","), *args.peers.split(",")], [e.name for e in endpoints]
    )
    sched_args = argparse.Namespace(**{**vars(args), "policy": "scls"})
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    return BenchSettings(
        entries=entries,
        num_workers=args.workers,
        model=args.model,
        dtype=args.dtype,
        threads_per_worker=threads,
        kv_budget_bytes=args.kv_budget,
        profile=not args.no_profile,
        scheduler=cli_args.scheduler_config(sched_args),
        seed=args.seed,
        repeats=args.repeats,
        max_duration_s=args.max_duration,
        slow_worker=args.slow_worker,
        stall_timeout_s=args.stall_timeout if args.stall_timeout > 0 else None,
        stats_interval_s=args.stats_interval,
        journal_dir=args.journal,
        step_log_dir=cli_args.step_log_dir(args.step_log),
        stream_interval=args.stream_interval,
        peer_batch_size=args.peer_batch_size,
        peer_page_size=args.peer_page_size,
        peer_max_batch_tokens=args.peer_max_batch_tokens,
        endpoints=endpoints,
        endpoint_api_key_file=args.endpoint_api_key_file and str(args.endpoint_api_key_file),
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
    )


class Prepared(NamedTuple):
    workload: Any  # after scaling
    arrival: Any
    items: list[Any]  # LoadItem
    send_times: Any
    prompts: Any  # the PromptMaker (decode: the prompts as text, for endpoints)


def prepare(args: argparse.Namespace, max_gen_len: int) -> Prepared:
    """The workload, arrival spec, load items and send times from the flags."""
    from engine.bench.loadgen import LoadItem
    from engine.bench.prefix_stats import ideal_prefix_hits
    from engine.bench.prompts import PromptMaker
    from engine.models import load_model_config, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    config = load_model_config(args.model)
    max_context_len = int(getattr(config, "max_position_embeddings", 0) or 2**31 - 1)

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    workload, arrival, times = scaled_load(args, max_gen_len, max_context_len, tokenize)
    maker = PromptMaker(tokenizer, args.seed)
    max_tokens = max_gen_len if args.lengths == "hidden" else None
    items = [
        LoadItem(
            r.index,
            maker.make(r.index, r.prompt_len, r.prompt_ids, r.segments),
            r.output_len,
            max_tokens,
        )
        for r in workload.requests
    ]
    workload.description["prefix"] = ideal_prefix_hits([it.prompt_ids for it in items])
    return Prepared(workload, arrival, items, times, maker)


def scaled_load(
    args: argparse.Namespace, max_gen_len: int, max_context_len: int, tokenize
) -> tuple[Any, Any, list[float] | None]:
    """The workload scaled by the length flags, its arrival spec and send times (None: a
    closed loop). ``tokenize`` turns a trace's text into token ids (ShareGPT)."""
    from engine.bench.arrivals import default_arrival, parse_arrival, send_times
    from engine.bench.workloads import LengthScaling, load_workload, scale_workload

    workload = load_workload(
        args.workload, args.num_requests, args.seed, args.trace_offset, tokenize,
        conversations=args.sample_conversations,
    )  # fmt: skip
    max_output = min(args.max_output_len or max_gen_len, max_gen_len)
    max_prompt = args.max_prompt_len
    if args.lengths == "hidden":  # the engine checks prompt + max_tokens against the context
        room = max_context_len - 1 - max_gen_len
        max_prompt = room if max_prompt is None else min(max_prompt, room)
    scaling = LengthScaling(
        prompt_divisor=args.prompt_divisor,
        output_divisor=args.output_divisor,
        min_output_len=args.min_output_len,
        max_prompt_len=max_prompt,
        max_output_len=max_output,
        max_total_len=max_context_len - 1,
    )
    workload = scale_workload(workload, scaling)
    arrival = parse_arrival(args.arrival) if args.arrival else default_arrival(workload)
    return workload, arrival, send_times(arrival, workload, args.seed)


def _resolve_endpoints(args: argparse.Namespace, settings, prepared: Prepared):
    """The settings with every endpoint resolved (its model and what it accepts, from a few
    probe requests, before any run starts), and the prompts as text if one needs them."""
    from engine.bench.endpoint import read_api_key, resolve_all

    if not settings.endpoints:
        return settings, None
    api_key = read_api_key(args.endpoint_api_key_file)
    endpoints = resolve_all(
        settings.endpoints, args.endpoint_model, api_key, prepared.items, prepared.prompts.decode
    )
    for ep in endpoints:
        print(f"bench: endpoint {ep.describe()}", flush=True)
    texts = None
    if any(ep.prompt == "text" for ep in endpoints):
        texts = [prepared.prompts.decode(it.prompt_ids) for it in prepared.items]
    return replace(settings, endpoints=endpoints), texts


def _check_start(args: argparse.Namespace, settings) -> None:
    """What `serve` refuses at start, refused before any worker starts: a --kv-budget that
    cannot hold one request; and where the results and journals go."""
    from engine.bench.runner import POLICY_VARIANTS
    from engine.cli_serve import check_model_and_budget

    if any(e in POLICY_VARIANTS for e in settings.entries):  # engines, whose workers check it
        check_model_and_budget(args, settings.scheduler.max_gen_len)
    cli_args.out_dir(args.out, "--out")
    if args.journal is not None:
        cli_args.out_dir(args.journal, "--journal")


def run_bench(args: argparse.Namespace) -> int:
    from engine.bench.metrics import MetricsError, parse_goodput
    from engine.bench.runner import BenchError, run_all
    from engine.bench.workloads import WorkloadError

    try:
        settings = _settings(args)
        goodput_ms = parse_goodput(args.goodput)
        baseline = (args.baseline or settings.entries[0]).lower()
        if baseline not in settings.entries:
            raise BenchError(f"--baseline {baseline!r} is not among {', '.join(settings.entries)}")
        _check_start(args, settings)
        prepared = prepare(args, settings.scheduler.max_gen_len)
        workload, arrival, items, times, _ = prepared
        settings, prompt_texts = _resolve_endpoints(args, settings, prepared)
    except (BenchError, MetricsError, WorkloadError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(
        f"bench: {len(items)} requests of {workload.name} ({arrival.label()}), entries "
        f"{', '.join(settings.entries)}, {settings.repeats} repeat(s); results in {args.out}",
        flush=True,
    )
    out = Results(args, settings.describe(), workload, arrival, goodput_ms, baseline)
    run_all(settings, items, times, arrival.concurrency, out.add, prompt_texts)
    print(out.finish())
    return 0


class Results:
    """The results directory of a run: results.json rewritten after every entry (``partial``
    until the end), then results.md and the plots (``bench`` and ``simulate`` share it)."""

    def __init__(
        self, args: argparse.Namespace, config: dict, workload, arrival, goodput_ms, baseline: str
    ) -> None:
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.plots = not args.no_plots
        self.command = "run.py " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
        self.config, self.arrival, self.goodput_ms = config, arrival, goodput_ms
        self.baseline = baseline
        self.slice_len = config.get("scheduler", {}).get("slice_len")
        self.workload = {
            "lengths": args.lengths,
            "name": workload.name,
            "kind": workload.kind,
            "description": workload.description,
            "attribution": workload.attribution,
        }
        self.results: list[Any] = []

    def write(self, partial: bool) -> dict[str, Any]:
        from engine.bench import report

        results = self.results
        doc = report.build_document(
            command=self.command, config=self.config, workload=self.workload,
            arrival=self.arrival.describe(), goodput_ms=self.goodput_ms,
            baseline=self.baseline if any(r.name == self.baseline for r in results) else results[0].name,
            results=results, slice_len=self.slice_len,
        )  # fmt: skip
        doc["partial"] = partial
        report.write_json(doc, self.out_dir / "results.json")
        return doc

    def add(self, result) -> None:
        self.results.append(result)
        self.write(partial=True)

    def finish(self) -> str:
        """Write everything; returns the markdown table."""
        from engine.bench import plots, report

        doc = self.write(partial=False)
        text = report.markdown(doc)
        (self.out_dir / "results.md").write_text(text, encoding="utf-8")
        if self.plots:
            plots.write_plots(doc, self.out_dir)
        return text


def bench_main(argv: list[str]) -> int:
    """``run.py bench ARGV`` from Python."""
    from engine.cli_base import Parser, run_command

    parser = Parser(prog="run.py bench")
    add_bench_parser(parser)
    args = parser.parse_args(argv)
    args.argv = ["bench", *argv]
    return run_command(run_bench, args)  # a mistake: one `error:` line and status 2
