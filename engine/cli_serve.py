"""`run.py serve` and `run.py broker`: start-up checks that refuse a configuration that cannot
serve, the broker, the worker children, and what `serve` says while they load."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import msgspec

from engine import cli_args
from engine.cli_base import CommandError, UsageError
from engine.config import BrokerConfig
from engine.start_checks import check_kv_budget

log = logging.getLogger(__name__)


def check_model_and_budget(args: argparse.Namespace, max_gen_len: int | None) -> None:
    """The model exists (ModelNotFoundError otherwise) and an explicit --kv-budget can serve it
    (its config is read, no weights)."""
    from engine.models import kv_bytes_per_token, load_model_config, resolve_model

    spec = resolve_model(args.model)
    if getattr(args, "kv_budget", None) is None:
        return
    per_token = kv_bytes_per_token(load_model_config(spec), args.dtype)
    warning = check_kv_budget(per_token, args.kv_budget, max_gen_len)
    if warning:
        log.warning("%s", warning)


def run_broker(args: argparse.Namespace) -> int:
    from engine.broker.journal import JournalError
    from engine.broker.main import serve_broker
    from engine.broker.server import BrokerStartError
    from engine.models import resolve_model

    if args.config_json:  # started by engine/supervisor.py: everything is in the config
        cfg = msgspec.json.decode(args.config_json, type=BrokerConfig)
    else:
        host, port = cli_args.bind_and_port(args)
        cfg = cli_args.broker_config(args, host, port)
    resolve_model(cfg.model)

    def announce(server) -> None:
        print(
            f"broker: clients {server.addresses['clients']}, workers {server.addresses['workers']}, "
            f"stats {server.addresses['stats']}",
            flush=True,
        )

    try:
        asyncio.run(serve_broker(cfg, on_ready=announce))
    except BrokerStartError as exc:
        raise CommandError(str(exc)) from None
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from engine.broker.main import serve_broker
    from engine.broker.server import BrokerStartError

    host, port = cli_args.bind_and_port(args)
    args.bind, args.port = host, port  # the gateway children get the plain host
    cfg = cli_args.broker_config(args, host, port)
    check_model_and_budget(args, cfg.scheduler.max_gen_len)
    children = _Children(args, cfg.curve_dir)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_ready(server) -> None:
            children.start(server)
            watch = threading.Thread(
                target=children.watch, args=(server, lambda: loop.call_soon_threadsafe(stop.set)),
                name="serve-watch", daemon=True,
            )  # fmt: skip
            watch.start()

        await serve_broker(cfg, on_ready=on_ready, stop=stop)

    try:
        asyncio.run(main())
    except BrokerStartError as exc:
        raise CommandError(str(exc)) from None
    finally:
        children.stop()
    if children.failure:
        raise CommandError(children.failure)
    return 0


class _Children:
    """The worker (and gateway) processes of `serve`: started once the broker is bound, watched
    until they join, stopped with it."""

    def __init__(self, args: argparse.Namespace, curve_dir: str | None) -> None:
        self.args = args
        self.curve_dir = curve_dir
        self.workers: list[subprocess.Popen] = []
        self.others: list[subprocess.Popen] = []
        self.failure: str | None = None
        self._stopping = threading.Event()

    def start(self, server) -> None:
        from engine.http.cli import serve_gateway_argv
        from engine.supervisor import spawn

        args, addrs = self.args, server.addresses
        worker_addr = addrs["workers"].replace("0.0.0.0", "127.0.0.1")
        for i in range(args.workers):
            argv = worker_argv(args, worker_addr, i)
            self.workers.append(
                spawn(argv + serve_curve_args(self.curve_dir, "workers", "serve-worker"))
            )
        http_curve = serve_curve_args(self.curve_dir, "clients", "serve-http")
        for http_argv in serve_gateway_argv(args, addrs, http_curve):  # a client, like the tui
            self.others.append(spawn(http_argv))
        print(
            f'engine: clients connect to {addrs["clients"]}  (run.py generate "..." --connect {addrs["clients"]})\n'
            f"engine: workers connect to {addrs['workers']}; stats published on {addrs['stats']} (run.py tui)\n"
            f"engine: policy {server.cfg.scheduler.policy}; starting {args.workers} worker(s) on {args.device}: "
            "each loads the model and, the first time on this machine, profiles it; requests wait "
            "until one joins. Ctrl-C stops all",
            flush=True,
        )  # fmt: skip

    def watch(self, server, stop_broker) -> None:
        """Say when every worker has joined; stop the broker if every worker exited."""
        started, announced = time.monotonic(), False
        while not self._stopping.is_set():
            num_joined = len(server.core.workers)
            if not announced and num_joined >= len(self.workers):
                print(f"engine: ready: {num_joined} worker(s) joined in {time.monotonic() - started:.0f} s", flush=True)  # fmt: skip
                announced = True
            codes = sorted({w.returncode for w in self.workers if w.poll() is not None})
            failed = bool(codes) and all(w.returncode not in (None, 0) for w in self.workers)
            if failed and not server.core.draining and not self._stopping.is_set():
                self.failure = (
                    f"every worker exited (status {', '.join(map(str, codes))}) before serving: "
                    "see their messages above"
                )
                stop_broker()
                return
            self._stopping.wait(0.25)

    def stop(self) -> None:
        from engine.supervisor import stop_all

        self._stopping.set()
        stop_all(self.workers + self.others)


def worker_argv(args: argparse.Namespace, worker_addr: str, index: int) -> list[str]:
    """`run.py worker` flags for worker ``index`` of `serve`."""
    num_threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    device = f"cuda:{index}" if args.device == "cuda" else args.device
    worker = cli_args.worker_config(args, worker_addr, device, num_threads)
    logs = ["--log-level", args.log_level, "--log-format", args.log_format]
    return ["worker", "--connect", worker_addr, *cli_args.worker_flags(worker), *logs]


def serve_curve_args(curve_dir: str | None, folder: str, name: str) -> list[str]:
    """`serve --curve DIR`: its workers use DIR/workers/serve-worker, its HTTP gateway
    DIR/clients/serve-http (each created once)."""
    if curve_dir is None:
        return []
    from engine.curve import create_key_pair

    secret = Path(curve_dir) / folder / f"{name}.key_secret"
    if not secret.exists():
        create_key_pair(secret.parent, name)
    return ["--curve-key", str(secret), "--broker-key", str(Path(curve_dir) / "broker.key")]
