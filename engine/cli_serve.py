"""`run.py serve` and `run.py broker`: start-up checks that refuse a configuration that cannot
serve, the broker, the worker children, and what `serve` says while they load."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import msgspec

from engine import cli_args
from engine.cli_base import EXIT_INTERRUPTED, CommandError, UsageError
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
        check_journal(cfg.journal_path)  # before the tokenizer loads: said at once
        check_curve_dir(cfg.curve_dir)
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
    """The broker as a supervised child process (restarted when it dies, on the same journal),
    its workers and gateways as children of this process: one LocalEngine, as in the demo."""
    from engine.broker.main import check_addresses_free
    from engine.broker.server import BrokerStartError

    host, port = cli_args.bind_and_port(args)
    cli_args.check_device(args.device)
    args.bind, args.port = host, port  # the gateway children get the plain host
    cfg = cli_args.broker_config(args, host, port)
    check_model_and_budget(args, cfg.scheduler.max_gen_len)
    try:
        check_addresses_free(cfg)
    except BrokerStartError as exc:
        raise CommandError(str(exc)) from None
    check_journal(cfg.journal_path)
    check_curve_dir(cfg.curve_dir)
    check_api_key_file(args)
    serve = _Serve(args, cfg)
    try:
        serve.run()
    finally:
        serve.stop()
        if port == 0 and not args.journal and cfg.journal_path:  # its own, for this run only
            for suffix in ("", "-wal"):
                Path(cfg.journal_path + suffix).unlink(missing_ok=True)
    if serve.abandoned_by is not None:  # a second signal: accepted requests were cut short
        name = "Ctrl-C" if serve.abandoned_by == signal.SIGINT else "SIGTERM"
        error = Interrupted if serve.abandoned_by == signal.SIGINT else CommandError
        raise error(
            f"stopped at once on a second {name}: the requests still running were answered "
            "shutting_down (one signal drains them)"
        )
    if serve.failure:
        raise CommandError(serve.failure)
    return 0


class Interrupted(CommandError):
    """Ctrl-C cut work short: README's status 130."""

    status = EXIT_INTERRUPTED


def check_curve_dir(curve_dir: str | None) -> None:
    """--curve DIR holds the broker's key pair (a usage error, CurveError, otherwise)."""
    if curve_dir is not None:
        from engine.curve import load_pair

        load_pair(Path(curve_dir) / "broker.key_secret")


def check_api_key_file(args: argparse.Namespace) -> None:
    """--api-key-file holds keys (read as the gateway child will), before any child starts."""
    if getattr(args, "api_key_file", None):
        from engine.http.auth import KeyFileError, load_keys

        try:
            load_keys(args.api_key_file)
        except KeyFileError as exc:
            raise UsageError(f"--api-key-file: {exc}") from None


def check_journal(path: str | None) -> None:
    """The journal opens (a usage error otherwise), before any child starts."""
    from engine.broker.journal import Journal, JournalError

    if path is not None:
        try:
            Journal(path).close()
        except JournalError as exc:
            raise UsageError(str(exc)) from None


class _Serve:
    """`serve`'s processes: the engine (supervised broker, workers), the gateways; signals
    (the first drains the broker, a second stops it at once); what it says while they start;
    a drain when its workers are gone and no other worker is joined."""

    GONE_GRACE_S = 5.0  # its workers gone, none joined this long: drain (lets connections drop)

    def __init__(self, args: argparse.Namespace, cfg: BrokerConfig) -> None:
        from engine.curve import ClientKeys
        from engine.launcher import LocalEngine

        self.args = args
        self.curve_dir = cfg.curve_dir
        keys = serve_curve_args(cfg.curve_dir, "clients", "serve-watch")
        curve = ClientKeys.load(keys[1], keys[3]) if keys else None
        logs = ["--log-level", args.log_level, "--log-format", args.log_format]
        self.engine = LocalEngine(
            cfg, num_workers=0, start_timeout_s=300, supervised=True, log_args=logs,
            max_restarts=args.broker_restarts, curve=curve,
        )  # fmt: skip
        self.others: list[subprocess.Popen] = []
        self.failure: str | None = None
        self.abandoned_by: int | None = None  # the signal that stopped a draining broker at once
        self._num_signals = 0  # SIGTERMs passed to the broker: 1 drains, 2 stop at once
        self._gone_since: float | None = None  # when serve's workers were all seen exited
        self._alone_since: float | None = None  # ... and no worker was joined
        self._said_others = False

    def run(self) -> None:
        from engine.launcher import EngineStartError

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            self.engine.start()
        except EngineStartError as exc:
            raise CommandError(str(exc)) from None
        if self._num_signals:  # stopped while the broker started
            return
        self._start_children()
        self._watch()

    def _on_signal(self, signum: int, frame: object) -> None:
        broker = self.engine.broker
        assert broker is not None
        if self._num_signals and broker.proc is not None and broker.proc.poll() is None:
            self.abandoned_by = signum  # it was draining: what is left is answered shutting_down
        self._signal_broker()

    def _signal_broker(self) -> None:
        """The first call drains the broker (and ends its supervision), a second stops it."""
        broker = self.engine.broker
        assert broker is not None
        self._num_signals += 1
        if self._num_signals == 1:
            broker.stop_supervising()
        broker.signal(signal.SIGTERM)

    def _start_children(self) -> None:
        from engine.http.cli import serve_gateway_argv
        from engine.supervisor import spawn

        args, addrs = self.args, self.engine.addresses
        worker_addr = addrs["workers"].replace("0.0.0.0", "127.0.0.1")
        for i in range(args.workers):
            flags = worker_argv(args, worker_addr, i)[3:]  # after "worker --connect ADDR"
            self.engine.add_worker(
                flags + serve_curve_args(self.curve_dir, "workers", "serve-worker")
            )
        http_curve = serve_curve_args(self.curve_dir, "clients", "serve-http")
        for http_argv in serve_gateway_argv(args, addrs, http_curve):  # a client, like the tui
            self.others.append(spawn(http_argv))
        print(
            f'engine: clients connect to {addrs["clients"]}  (run.py generate "..." --connect {addrs["clients"]})\n'
            f"engine: workers connect to {addrs['workers']}; stats published on {addrs['stats']} (run.py tui)\n"
            f"engine: policy {args.policy}; starting {args.workers} worker(s) on {args.device}: "
            "each loads the model and, the first time on this machine, profiles it; requests wait "
            "until one joins. Ctrl-C stops all",
            flush=True,
        )  # fmt: skip

    def _watch(self) -> None:
        """Until the broker is gone for good: say when every worker has joined; when serve's
        workers have all exited and no other worker is joined, drain the broker (one signal)."""
        broker, workers = self.engine.broker, self.engine.procs
        assert broker is not None
        started_at = time.monotonic()
        joined_at: float | None = None  # when a worker had first joined
        announced = False
        while not broker.exited.wait(0.25 if self._gone_since is None else 1.0):
            if not announced:
                num_joined = self.engine.num_workers_joined()
                joined_at = joined_at or (time.monotonic() if num_joined else None)
                if num_joined >= len(workers):
                    print(f"engine: ready: {len(workers)} worker(s) joined in {time.monotonic() - started_at:.0f} s", flush=True)  # fmt: skip
                    announced = True
            if not self._num_signals and all(w.poll() is not None for w in workers):
                self._on_workers_gone(joined_at)
        self.failure = self.failure or broker.failure

    def _on_workers_gone(self, joined_at: float | None) -> None:
        """Serve's workers have all exited: serve on while another worker is joined (one that
        ran `run.py worker --connect`); drain the broker once none has been for GONE_GRACE_S
        (at once if none ever joined). The grace lets dead workers' connections drop and a
        worker rejoin a restarted broker (num_workers_joined is 0 while it does not answer)."""
        now = time.monotonic()
        self._gone_since = self._gone_since or now
        num_joined = self.engine.num_workers_joined()
        gone = self._workers_gone(joined_at)
        if num_joined:
            self._alone_since = None
            if now - self._gone_since >= self.GONE_GRACE_S and not self._said_others:
                log.warning("%s; %d other worker(s) joined: serving on with them", gone, num_joined)  # fmt: skip
                self._said_others = True
            return
        self._alone_since = self._alone_since or now
        if joined_at is None or now - self._alone_since >= self.GONE_GRACE_S:
            self.failure = f"{gone}, and no other worker is joined: drained the broker and stopped"  # fmt: skip
            log.warning("%s; no other worker is joined: draining the broker", gone)
            self._signal_broker()

    def _workers_gone(self, joined_at: float | None) -> str:
        """What happened to serve's workers, in a few words."""
        from engine.supervisor import exit_text

        how = ", ".join(sorted({exit_text(w.returncode) for w in self.engine.procs}))
        if joined_at is None:
            return f"every worker of serve exited ({how}) before joining: see their messages above"
        return (
            f"every worker of serve exited ({how}), {(self._gone_since or 0) - joined_at:.0f} s after "
            "the first joined"
        )

    def stop(self) -> None:
        from engine.supervisor import stop_all

        self.engine.stop()
        stop_all(self.others)


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
