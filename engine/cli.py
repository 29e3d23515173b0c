"""The one launcher: serve | broker | worker | generate | chat | tui | demo | profile | bench |
keys | simulate | http. Every mistake ends in one line and an exit status (engine/cli_base.py)."""

from __future__ import annotations

import argparse
import sys

from engine import cli_args, logs
from engine.cli_base import (
    CommandError,
    Parser,
    UsageError,
    positive_float,
    positive_int,
    run_command,
)
from engine.cli_client import add_request_flags, run_chat, run_generate
from engine.cli_serve import run_broker, run_serve

DEFAULT_STATS_CONNECT = "tcp://127.0.0.1:5557"


def _keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.curve import CurveError, create_key_pair

    root = Path(args.dir)
    clients, workers = args.client or [], args.worker or []
    for flag, names in (("--client", clients), ("--worker", workers)):
        _check_key_names(flag, names)
    if root.exists() and not root.is_dir():
        raise UsageError(
            f"{root} is a file: give a directory for the keys (the broker's --curve DIR)"
        )
    wanted = [(root, "broker")] if not (root / "broker.key_secret").exists() else []
    if not clients and not workers:
        clients, workers = ["client"], ["worker"]
    wanted += [(root / "clients", n) for n in clients] + [(root / "workers", n) for n in workers]
    try:
        for folder, name in wanted:
            public, secret = create_key_pair(folder, name)
            print(f"created {public} (public) and {secret} (private, mode 0600)")
    except CurveError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise UsageError(
            f"cannot write keys in {root} ({exc.strerror}): give a directory you can write"
        ) from None
    print(
        f"broker:  run.py broker --curve {root}\n"
        f"worker:  run.py worker --curve-key {root}/workers/NAME.key_secret --broker-key {root}/broker.key\n"
        f"client:  run.py generate ... --curve-key {root}/clients/NAME.key_secret --broker-key {root}/broker.key\n"
        "Move each private *.key_secret file to the host that uses it; the broker needs only the "
        "public *.key files in clients/ and workers/."
    )
    return 0


def _check_key_names(flag: str, names: list[str]) -> None:
    """Key names are plain file names (letters, digits, -, _, .), each once."""
    import re

    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
            raise UsageError(
                f"{flag} {name!r}: a key name is a plain file name of letters, digits, "
                "-, _ and . (not starting with .)"
            )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"{flag} {', '.join(twice)} given twice: name each key once")


def _worker(args: argparse.Namespace) -> int:
    from engine.models import resolve_model
    from engine.worker.main import run_worker

    resolve_model(args.model)  # a wrong --model is said before torch loads
    cli_args.check_device(args.device)
    if args.curve_key or args.broker_key:  # and wrong keys too (CurveError: a usage error)
        from engine.curve import ClientKeys

        if not args.curve_key:
            raise UsageError("--broker-key needs --curve-key too: pass this worker's *.key_secret")
        ClientKeys.load(args.curve_key, args.broker_key or "")
    cfg = cli_args.worker_config(args, args.connect, args.device, args.threads)
    return run_worker(cfg)


def _tui(args: argparse.Namespace) -> int:
    from tui.app import run_dashboard

    curve = None
    if args.curve_key:
        from engine.curve import ClientKeys

        curve = ClientKeys.load(args.curve_key, args.broker_key or "")
    if not sys.stdout.isatty():
        raise UsageError("the dashboard needs a terminal: run it in one (or use `run.py generate`)")
    run_dashboard(_stats_address(args.connect, curve), curve)
    return 0


def _stats_address(addr: str, curve) -> str:
    """The broker's stats address: ``addr`` itself, or, when ``addr`` is its client address,
    the stats address the broker announces there (docs/PROTOCOL.md, GetStats)."""
    import asyncio

    from engine.client.stats import find_stats_address

    found = asyncio.run(find_stats_address(addr, curve=curve))
    if found is not None and found != addr:
        print(
            f"tui: {addr} is the broker's client address; its stats are at {found}", file=sys.stderr
        )
    return found or addr


def _demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo
    from engine.launcher import EngineStartError

    try:
        return run_demo(args)
    except EngineStartError as exc:
        raise CommandError(str(exc)) from None


def _profile(args: argparse.Namespace) -> int:
    from engine.models import resolve_model
    from engine.worker.main import run_profile

    resolve_model(args.model)
    cli_args.check_device(args.device)
    return run_profile(cli_args.worker_config(args, "", args.device, args.threads))


def _http(args: argparse.Namespace) -> int:
    from engine.http.cli import run_http
    from engine.models import resolve_model

    resolve_model(args.model)  # a wrong --model is a usage error, as for the other commands
    return run_http(args)


def _bench(args: argparse.Namespace) -> int:
    from engine.bench.cli import run_bench

    return run_bench(args)


def _simulate(args: argparse.Namespace) -> int:
    from engine.bench.simulate import run_simulate

    return run_simulate(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"scls-engine {version('scls-engine')}"
    except PackageNotFoundError:
        return "scls-engine (not installed: run `make install`)"


def build_parser() -> argparse.ArgumentParser:
    from engine.bench.cli import add_bench_parser
    from engine.bench.simulate import add_simulate_parser
    from engine.http.cli import add_http_parser, add_serve_flags

    ap = Parser(prog="run.py", description="SCLS LLM serving engine")
    ap.add_argument("--version", action="version", version=_version())
    _add_log_flags(ap, argparse.SUPPRESS)
    ap.set_defaults(log_level="INFO", log_format="text")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_log_flags(p, argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    p = command("serve", run_serve, "start a broker and N workers as child processes")
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes to start")
    p.add_argument(
        "--device",
        type=cli_args.device_arg,
        default="cpu",
        help='"cpu" or "cuda" (one worker per GPU)',
    )
    cli_args.add_bind_flags(p, "client port; workers use PORT+1, stats PORT+2 (0: any free ports)")
    cli_args.add_scheduler_flags(p)
    cli_args.add_worker_flags(p)
    cli_args.add_broker_flags(p)
    cli_args.add_journal_flags(p, serve=True)
    add_serve_flags(p)

    p = command("broker", run_broker, "run the broker alone (workers join with `worker --connect`)")
    cli_args.add_bind_flags(p, "client port; workers use PORT+1, stats PORT+2 (0: any free ports)")
    p.add_argument("--model", default="embedded", help="model whose tokenizer the broker uses")
    cli_args.add_scheduler_flags(p)
    cli_args.add_broker_flags(p)
    cli_args.add_journal_flags(p, serve=False)
    p.add_argument("--config-json", help=argparse.SUPPRESS)  # a supervised broker (launcher.py)

    p = command("worker", _worker, "run one model worker that joins a broker")
    p.add_argument(
        "--connect",
        type=cli_args.connect_arg("tcp://127.0.0.1:5556"),
        default="tcp://127.0.0.1:5556",
        help="the broker's worker address (its client port + 1), HOST:PORT or tcp://HOST:PORT",
    )
    p.add_argument("--device", type=cli_args.device_arg, default="cpu", help='"cpu" or "cuda:N"')
    p.add_argument("--worker-id", default=None, help="its name (default: host-pid-device)")
    p.add_argument(
        "--drain-timeout", type=positive_float, default=30.0, help="on SIGTERM: seconds to finish its work"
    )  # fmt: skip
    cli_args.add_worker_flags(p)
    cli_args.add_curve_client_flags(p)

    p = command("generate", run_generate, "send one prompt and print the answer")
    p.add_argument("prompt", help="the prompt; - reads it from stdin, @FILE from a file")
    add_request_flags(p)
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument(
        "--raw", dest="chat", action="store_false", help="send the prompt as is, without the chat template"
    )  # fmt: skip

    p = command("chat", run_chat, "an interactive conversation that keeps its history")
    add_request_flags(p)

    p = command("tui", _tui, "the live dashboard")
    p.add_argument(
        "--connect",
        type=cli_args.connect_arg(DEFAULT_STATS_CONNECT),
        default=DEFAULT_STATS_CONNECT,
        help="the broker's stats address, or its client address (the stats address is then asked)",
    )
    cli_args.add_curve_client_flags(p)

    p = command("demo", _demo, "start the engine, send a scripted load and show it live")
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes")
    p.add_argument("--num-requests", type=positive_int, default=24, help="requests to send")
    p.add_argument("--port", type=_demo_port, default=5555, help="client port (PORT+1, PORT+2 too)")
    p.add_argument("--plain", action="store_true", help="plain lines instead of the dashboard")
    cli_args.add_scheduler_flags(p)
    cli_args.add_worker_flags(p)

    p = command("profile", _profile, "profile this device and fit the time model (cached)")
    p.add_argument("--device", type=cli_args.device_arg, default="cpu", help='"cpu" or "cuda:N"')
    cli_args.add_worker_flags(p, serving=False)

    p = command("keys", _keys, "create CURVE key pairs for a broker started with --curve")
    p.add_argument("dir", help="key directory (the broker's --curve DIR)")
    p.add_argument("--client", action="append", help="create clients/NAME.key* (repeatable)")
    p.add_argument("--worker", action="append", help="create workers/NAME.key* (repeatable)")

    p = command("bench", _bench, "benchmark policies (and transformers peers) on a workload")
    add_bench_parser(p)

    p = command("simulate", _simulate, "the benchmark's load on a simulated cluster (engine/sim)")
    add_simulate_parser(p)

    p = command("http", _http, "the OpenAI-compatible HTTP API and /metrics, a client of a broker")
    add_http_parser(p)
    return ap


def _add_log_flags(p: argparse.ArgumentParser, default) -> None:
    """--log-level and --log-format, before or after the command (the command's wins)."""
    p.add_argument(
        "--log-level",
        default=default,
        type=str.upper,
        choices=logs.LOG_LEVELS,
        help="DEBUG also shows the traceback of an error (default: INFO)",
    )
    p.add_argument(
        "--log-format",
        default=default,
        type=str.lower,
        choices=logs.LOG_FORMATS,
        help="json: one JSON object per line (default: text)",
    )


def _demo_port(text: str) -> int:
    from engine.cli_base import port

    value = port(text)
    if not 1 <= value <= 65533:
        raise argparse.ArgumentTypeError(
            f"must be in 1..65533 (PORT+1 and PORT+2 are used too), got {value}"
        )
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
