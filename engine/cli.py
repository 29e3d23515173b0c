"""The one launcher: serve | broker | worker | generate | tui | demo | profile | bench | keys | http."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from engine import cli_args

DEFAULT_CONNECT = "tcp://127.0.0.1:5555"


def _serve(args: argparse.Namespace) -> int:
    from engine.broker.main import serve_broker
    from engine.http.cli import serve_gateway_argv
    from engine.supervisor import spawn, stop_all

    cfg = cli_args.broker_config(args, args.bind, args.port)
    procs = []
    num_threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)

    def start_workers(server) -> None:
        worker_addr = server.addresses["workers"].replace("0.0.0.0", "127.0.0.1")
        for i in range(args.workers):
            device = f"cuda:{i}" if args.device == "cuda" else args.device
            argv = [
                "worker",
                "--connect",
                worker_addr,
                "--device",
                device,
                "--model",
                args.model,
                "--dtype",
                args.dtype,
                "--threads",
                str(num_threads),
                "--log-level",
                args.log_level,
            ]
            if args.kv_budget:
                argv += ["--kv-budget", str(args.kv_budget)]
            if args.host_kv_budget is not None:
                argv += ["--host-kv-budget", str(args.host_kv_budget)]
            if args.no_profile:
                argv.append("--no-profile")
            procs.append(spawn(argv + _serve_curve_args(cfg.curve_dir, "workers", "serve-worker")))
        addrs = server.addresses
        http_curve = _serve_curve_args(cfg.curve_dir, "clients", "serve-http")
        for http_argv in serve_gateway_argv(args, addrs, http_curve):  # a client, like the tui
            procs.append(spawn(http_argv))
        print(
            f'engine: clients connect to {addrs["clients"]}  (run.py generate "..." --connect {addrs["clients"]})',
            flush=True,
        )
        print(
            f"engine: workers connect to {addrs['workers']}; stats published on {addrs['stats']} (run.py tui)",
            flush=True,
        )
        print(
            f"engine: policy {cfg.scheduler.policy}, {args.workers} worker(s) on {args.device}; Ctrl-C stops all",
            flush=True,
        )

    try:
        asyncio.run(serve_broker(cfg, on_ready=start_workers))
    finally:
        stop_all(procs)
    return 0


def _serve_curve_args(curve_dir: str | None, folder: str, name: str) -> list[str]:
    """`serve --curve DIR`: its workers use DIR/workers/serve-worker, its HTTP gateway
    DIR/clients/serve-http (each created once)."""
    if curve_dir is None:
        return []
    from pathlib import Path

    from engine.curve import create_key_pair

    secret = Path(curve_dir) / folder / f"{name}.key_secret"
    if not secret.exists():
        create_key_pair(secret.parent, name)
    return ["--curve-key", str(secret), "--broker-key", str(Path(curve_dir) / "broker.key")]


def _keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.curve import CurveError, create_key_pair

    root = Path(args.dir)
    wanted = [(root, "broker")] if not (root / "broker.key_secret").exists() else []
    clients, workers = args.client or [], args.worker or []
    if not clients and not workers:
        clients, workers = ["client"], ["worker"]
    wanted += [(root / "clients", n) for n in clients] + [(root / "workers", n) for n in workers]
    try:
        for folder, name in wanted:
            public, secret = create_key_pair(folder, name)
            print(f"created {public} (public) and {secret} (private, mode 0600)")
    except CurveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"broker:  run.py broker --curve {root}\n"
        f"worker:  run.py worker --curve-key {root}/workers/NAME.key_secret --broker-key {root}/broker.key\n"
        f"client:  run.py generate ... --curve-key {root}/clients/NAME.key_secret --broker-key {root}/broker.key\n"
        "Move each private *.key_secret file to the host that uses it; the broker needs only the "
        "public *.key files in clients/ and workers/."
    )
    return 0


def _broker(args: argparse.Namespace) -> int:
    from engine.broker.main import serve_broker

    cfg = cli_args.broker_config(args, args.bind, args.port)

    def announce(server) -> None:
        print(
            f"broker: clients {server.addresses['clients']}, workers {server.addresses['workers']}, "
            f"stats {server.addresses['stats']}",
            flush=True,
        )

    asyncio.run(serve_broker(cfg, on_ready=announce))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from engine.worker.main import run_worker

    cfg = cli_args.worker_config(args, args.connect, args.device, args.threads)
    return run_worker(cfg)


def _generate(args: argparse.Namespace) -> int:
    from engine.client import Client, EngineError

    params = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or (),
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
    )
    prompt = (
        {"messages": [{"role": "user", "content": args.prompt}]}
        if args.chat
        else {"prompt": args.prompt}
    )
    curve = None
    if args.curve_key:
        from engine.curve import ClientKeys

        curve = ClientKeys.load(args.curve_key, args.broker_key or "")
    try:
        with Client(args.connect, curve=curve) as client:
            if args.stream:
                stream = client.stream(**prompt, **params)
                for delta in stream:
                    print(delta.text, end="", flush=True)
                print()
                result = stream.result
            else:
                result = client.generate(**prompt, **params)
                print(result.text, flush=True)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    u, t = result.usage, result.timings
    ttft = f"{t.first_token_s * 1000:.0f} ms" if t.first_token_s is not None else "n/a"
    print(
        f"[{result.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens; "
        f"first token {ttft}; total {t.finished_s:.2f} s; {result.num_slices} slice(s)]",
        file=sys.stderr,
    )
    return 0


def _tui(args: argparse.Namespace) -> int:
    from tui.app import run_dashboard

    curve = None
    if args.curve_key:
        from engine.curve import ClientKeys

        curve = ClientKeys.load(args.curve_key, args.broker_key or "")
    run_dashboard(args.connect, curve)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo

    return run_demo(args)


def _profile(args: argparse.Namespace) -> int:
    from engine.worker.main import run_profile

    return run_profile(cli_args.worker_config(args, "", args.device, args.threads))


def _http(args: argparse.Namespace) -> int:
    from engine.http.cli import run_http

    return run_http(args)


def _bench(args: argparse.Namespace) -> int:
    from engine.bench.cli import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    from engine.bench.cli import add_bench_parser
    from engine.http.cli import add_http_parser, add_serve_flags

    ap = argparse.ArgumentParser(prog="run.py", description="SCLS LLM serving engine")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
        )
        p.set_defaults(func=func)
        return p

    p = command("serve", _serve, "start a broker and N workers as child processes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", help='"cpu" or "cuda" (one worker per GPU)')
    p.add_argument("--bind", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument(
        "--port", type=int, default=5555, help="client port; workers use PORT+1, stats PORT+2"
    )
    cli_args.add_scheduler_flags(p)
    cli_args.add_worker_flags(p)
    cli_args.add_broker_flags(p)
    add_serve_flags(p)

    p = command("broker", _broker, "run the broker alone (workers join with `worker --connect`)")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555, help="client port (0: any free ports)")
    p.add_argument("--model", default="embedded", help="model whose tokenizer the broker uses")
    cli_args.add_scheduler_flags(p)
    cli_args.add_broker_flags(p)

    p = command("worker", _worker, "run one model worker that joins a broker")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", help="the broker's worker address")
    p.add_argument("--device", default="cpu", help='"cpu" or "cuda:N"')
    p.add_argument("--worker-id", default=None)
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="on SIGTERM: seconds to finish its work"
    )
    cli_args.add_worker_flags(p)
    cli_args.add_curve_client_flags(p)

    p = command("generate", _generate, "send one prompt and print the answer")
    p.add_argument("prompt")
    p.add_argument("--connect", default=DEFAULT_CONNECT)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stream", action="store_true")
    p.add_argument(
        "--raw",
        dest="chat",
        action="store_false",
        help="send the prompt as is, without the chat template",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds")
    cli_args.add_curve_client_flags(p)

    p = command("tui", _tui, "the live dashboard")
    p.add_argument("--connect", default="tcp://127.0.0.1:5557", help="the broker's stats address")
    cli_args.add_curve_client_flags(p)

    p = command("demo", _demo, "start the engine, send a scripted load and show it live")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--plain", action="store_true", help="plain lines instead of the dashboard")
    cli_args.add_scheduler_flags(p)
    cli_args.add_worker_flags(p)

    p = command("profile", _profile, "profile this device and fit the time model (cached)")
    p.add_argument("--device", default="cpu")
    cli_args.add_worker_flags(p)

    p = command("keys", _keys, "create CURVE key pairs for a broker started with --curve")
    p.add_argument("dir", help="key directory (the broker's --curve DIR)")
    p.add_argument("--client", action="append", help="create clients/NAME.key* (repeatable)")
    p.add_argument("--worker", action="append", help="create workers/NAME.key* (repeatable)")

    p = command("bench", _bench, "benchmark policies (and transformers peers) on a workload")
    add_bench_parser(p)

    p = command("http", _http, "the OpenAI-compatible HTTP API and /metrics, a client of a broker")
    add_http_parser(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
