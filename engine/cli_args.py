"""Command-line flags shared by the subcommands, and their conversion into component configs."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from engine import addresses
from engine.cli_base import (
    UsageError,
    non_negative_float,
    non_negative_int,
    port,
    positive_int,
)
from engine.config import BrokerConfig, SchedulerConfig, WorkerConfig

DEFAULT_PORT = 5555

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use bytes or a unit, e.g. 512MiB, 2GiB or 1TiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def positive_bytes(text: str) -> int:
    value = parse_bytes(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be above 0 bytes, got {text!r}")
    return value


def device_arg(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (whether torch sees that device is
    ``check_device``'s, when the command starts: parsing imports no torch)."""
    name = text.strip().lower()
    if name != "cpu" and re.fullmatch(r"cuda(:\d+)?", name) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return name


def check_device(device: str) -> None:
    """A CUDA ``--device`` that torch sees here (a UsageError otherwise), before weights load."""
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError(
            f"--device {device}: no CUDA device is visible to torch here (CUDA_VISIBLE_DEVICES, "
            "the driver, or a CPU-only torch): use cpu"
        )
    index = device.partition(":")[2]
    if index and int(index) >= count:
        raise UsageError(
            f"--device {device}: torch sees {count} CUDA device(s): use cuda:0 to cuda:{count - 1}"
        )


def connect_arg(example: str):
    """An argparse type: an address to connect to, as ``tcp://HOST:PORT``."""

    def convert(text: str) -> str:
        try:
            return addresses.connect_address(text, example)
        except addresses.AddressError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = "address"
    return convert


def bind_arg(text: str) -> str:
    """An argparse type: an address to bind, as ``tcp://HOST:PORT`` (PORT may be ``*``)."""
    try:
        return addresses.bind_address(text)
    except addresses.AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_bind_flags(ap: argparse.ArgumentParser, port_help: str) -> None:
    """``--bind HOST[:PORT]`` and ``--port``: the broker's three ports start at PORT."""
    ap.add_argument(
        "--bind",
        default="127.0.0.1",
        help="interface to bind: 127.0.0.1 (this machine only), 0.0.0.0 (every interface); "
        "HOST:PORT or tcp://HOST:PORT also sets the port",
    )
    ap.add_argument(
        "--port", type=port, default=None, help=f"{port_help} (default: {DEFAULT_PORT})"
    )


def add_scheduler_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("scheduling")
    g.add_argument(
        "--policy",
        choices=["scls", "scls:strict", "ils", "sls"],
        default="scls",
        help="scls: continuous slice-level scheduling; scls:strict: the paper's, a batch per "
        "slice; ils: continuous batching; sls: static batches",
    )
    g.add_argument(
        "--slice-len", type=positive_int, default=64, help="SCLS: decode steps per slice (S)"
    )
    g.add_argument(
        "--max-gen-len",
        type=positive_int,
        default=1024,
        help="maximal generation length L (tokens)",
    )
    g.add_argument(
        "--kv-mode",
        choices=["auto", "keep", "recompute"],
        default="auto",
        help="between slices: auto (the cheapest of keeping, offloading, handing off to another "
        "worker or recomputing each KV cache), keep (on its worker), or recompute (re-prefill)",
    )
    g.add_argument(
        "--ils-admission",
        choices=["reserve", "optimistic"],
        default="reserve",
        help="ILS: reserve max_tokens per request at admission, or admit on current usage",
    )
    g.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=None,
        help="ILS: cap on running requests per worker (default: what memory allows)",
    )
    g.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=256,
        help="most requests in one batch or running set",
    )


def add_broker_flags(ap: argparse.ArgumentParser) -> None:
    """Reliability and security of a broker: queue bound, grace, drain, CURVE."""
    g = ap.add_argument_group("reliability and security")
    g.add_argument(
        "--max-queued-requests",
        type=non_negative_int,
        default=4096,
        help="accepted, unfinished requests beyond which a Submit is refused 'overloaded' (0: no limit)",
    )
    g.add_argument(
        "--max-queued-tokens",
        type=non_negative_int,
        default=0,
        help="prompt plus max_tokens of accepted, unfinished requests beyond which a Submit is "
        "refused 'overloaded' (0: no limit)",
    )
    g.add_argument(
        "--client-grace",
        type=non_negative_float,
        default=5.0,
        help="seconds a closed client connection's requests run on, so that it can resume them",
    )
    g.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=30.0,
        help="on SIGTERM: seconds to finish accepted requests before stopping",
    )
    g.add_argument(
        "--curve",
        metavar="DIR",
        default=None,
        help="encrypt and authenticate with CurveZMQ: DIR/broker.key_secret, allowed keys in "
        "DIR/clients and DIR/workers (create them with `run.py keys DIR`)",
    )


def add_journal_flags(ap: argparse.ArgumentParser, serve: bool) -> None:
    """The request journal: on by default for `serve`, off for `broker` unless given a path."""
    g = ap.add_argument_group(
        "request journal (docs/RELIABILITY.md)"
    ).add_mutually_exclusive_group()
    default = f"{state_dir()}/journal-PORT.sqlite" if serve else "none"
    g.add_argument(
        "--journal",
        metavar="PATH",
        default=None,
        help="record accepted requests and their tokens in this SQLite file, so that a broker "
        f"restarted on it continues them (default: {default})",
    )
    g.add_argument("--no-journal", action="store_true", help="keep no journal")
    ap.set_defaults(journal_by_default=serve)
    if serve:
        ap.add_argument(
            "--broker-restarts",
            type=non_negative_int,
            default=5,
            help="how many times in a row a broker that died is started again (its workers "
            "stay; with the journal its requests continue)",
        )


def state_dir() -> Path:
    """Where this user's engine keeps state between runs ($XDG_STATE_HOME/scls-engine)."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "scls-engine"


def journal_path(args: argparse.Namespace, port: int) -> str | None:
    """--journal, else the default of `serve` (one per client port; with --port 0, one per
    process, which `serve` removes when it exits), else None."""
    if getattr(args, "no_journal", False):
        return None
    if getattr(args, "journal", None):
        return args.journal
    if not getattr(args, "journal_by_default", False):
        return None
    name = f"journal-{port}.sqlite" if port else f"journal-pid{os.getpid()}.sqlite"
    return str(state_dir() / name)


def add_curve_client_flags(ap: argparse.ArgumentParser) -> None:
    """A peer of a CURVE broker: its own key pair and the broker's public key."""
    g = ap.add_argument_group("CURVE (with a broker started with --curve)")
    g.add_argument(
        "--curve-key", metavar="FILE", default=None, help="this peer's *.key_secret file"
    )
    g.add_argument(
        "--broker-key", metavar="FILE", default=None, help="the broker's broker.key file"
    )


def add_worker_flags(ap: argparse.ArgumentParser, serving: bool = True) -> None:
    """A worker's flags; ``serving=False`` (``profile``): those of its model and device only."""
    g = ap.add_argument_group("worker")
    g.add_argument(
        "--model",
        default="embedded",
        help='"embedded" (SmolLM2-135M-Instruct), a transformers model directory, or a .gguf file',
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights and KV cache (float32: batched greedy decoding equals one at a time)",
    )
    g.add_argument(
        "--kv-budget",
        type=positive_bytes,
        default=None,
        help="KV-cache budget per worker, e.g. 512MiB (CPU default 2GiB; GPU: free memory)",
    )
    g.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads per worker (CPU; default: the cores shared among the workers)",
    )
    if serving:
        _add_serving_flags(g)
    g.add_argument("--slowdown", type=float, default=1.0, help=argparse.SUPPRESS)  # benchmarks


def _add_serving_flags(g) -> None:
    """The flags of a worker that serves (not of `profile`)."""
    g.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the start-up time profile (the time model then uses defaults)",
    )
    g.add_argument(
        "--host-kv-budget",
        type=parse_bytes,
        default=None,
        help="host memory for KV caches offloaded between slices, e.g. 4GiB (default 2GiB; 0: none)",
    )
    g.add_argument(
        "--peer-bind",
        type=bind_arg,
        default="tcp://127.0.0.1:*",
        help="where this worker serves KV caches to other workers (port * picks a free one)",
    )
    g.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not reuse the KV of repeated prompt prefixes (automatic prefix caching is on)",
    )
    g.add_argument(
        "--stream-interval",
        type=positive_int,
        default=1,
        metavar="STEPS",
        help="send sampled tokens every STEPS steps (at once for a request's first token): "
        "fewer messages for the broker at many workers, tokens in bursts (vLLM's option)",
    )
    g.add_argument(
        "--step-log",
        metavar="DIR",
        default=None,
        help="append every forward's shape and seconds to DIR/<worker id>.jsonl "
        "(for fitting the simulator: python -m engine.bench.calibrate)",
    )


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    for name in ("slice_len", "max_gen_len", "max_batch_size"):  # callers without the parser
        if getattr(args, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    return SchedulerConfig(
        policy=args.policy,
        slice_len=args.slice_len,
        max_gen_len=args.max_gen_len,
        kv_mode=args.kv_mode,
        ils_admission=args.ils_admission,
        max_concurrency=args.max_concurrency,
        max_batch_size=args.max_batch_size,
    )


def bind_and_port(args: argparse.Namespace) -> tuple[str, int]:
    """``--bind HOST[:PORT]`` and ``--port``: (host, client port); raises UsageError when the
    two disagree or the port leaves no room for PORT+1 and PORT+2."""
    try:
        host, bound_port = addresses.bind_host(args.bind)
    except addresses.AddressError as exc:
        raise UsageError(f"--bind {exc}") from None
    if bound_port is not None and args.port is not None and bound_port != args.port:
        raise UsageError(
            f"--bind {args.bind} names port {bound_port} but --port is {args.port}: give one"
        )
    check_local_host(host)
    client_port = bound_port if bound_port is not None else args.port
    client_port = DEFAULT_PORT if client_port is None else client_port
    if client_port > addresses.MAX_PORT - 2:
        raise UsageError(
            f"--port {client_port} leaves no room for the worker and stats ports (PORT+1 and "
            f"PORT+2): use at most {addresses.MAX_PORT - 2}"
        )
    return host, client_port


def check_local_host(host: str) -> None:
    """--bind names an address of this host (a UsageError saying so, before any port is
    tried: binding elsewhere fails whatever the port)."""
    import errno
    import socket

    if host in ("*", "0.0.0.0", "::", "[::]"):
        return
    name = host.strip("[]")
    try:
        infos = socket.getaddrinfo(name, 0, type=socket.SOCK_STREAM)
    except OSError:
        raise UsageError(f"--bind {host}: no such host: give an address of this host") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                return  # anything else is the broker's to report, with the port
            raise UsageError(
                f"--bind {host} is not an address of this host: use 127.0.0.1 (this machine "
                "only), 0.0.0.0 (every interface) or one of this host's addresses"
            ) from None


def broker_config(args: argparse.Namespace, host: str, port: int) -> BrokerConfig:
    """Port 0: any free ports (printed once bound)."""
    ports = ["*"] * 3 if port == 0 else [port, port + 1, port + 2]
    return BrokerConfig(
        client_addr=f"tcp://{host}:{ports[0]}",
        worker_addr=f"tcp://{host}:{ports[1]}",
        stats_addr=f"tcp://{host}:{ports[2]}",
        model=args.model,
        scheduler=scheduler_config(args),
        max_queued_requests=getattr(args, "max_queued_requests", 4096) or None,
        max_queued_tokens=getattr(args, "max_queued_tokens", 0) or None,
        client_grace_s=getattr(args, "client_grace", 5.0),
        drain_timeout_s=getattr(args, "drain_timeout", 30.0),
        curve_dir=getattr(args, "curve", None),
        journal_path=journal_path(args, port),
    )


def out_dir(directory: str | os.PathLike[str], flag: str) -> Path:
    """A directory to write results into (``--out``, ``--journal DIR``), created if missing; a
    UsageError naming ``flag`` when it is a file, under a file, or cannot be written."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {directory}: a file, not a directory: give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{flag} {directory}: cannot create it ({exc.strerror}): give a writable directory"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {directory}: not writable: give a writable directory")
    return path


def step_log_dir(directory: str | None) -> str | None:
    """``--step-log DIR``, created if missing; a UsageError when it cannot be written."""
    if directory is None:
        return None
    out_dir(directory, "--step-log")
    return directory


def worker_config(
    args: argparse.Namespace, connect: str, device: str, threads: int | None
) -> WorkerConfig:
    return WorkerConfig(
        connect=connect,
        model=args.model,
        device=device,
        dtype=args.dtype,
        kv_budget_bytes=args.kv_budget,
        num_threads=threads,
        profile=not getattr(args, "no_profile", False),
        host_kv_budget_bytes=getattr(args, "host_kv_budget", None),
        peer_bind=getattr(args, "peer_bind", None) or "tcp://127.0.0.1:*",
        slowdown=getattr(args, "slowdown", 1.0),
        prefix_cache=not getattr(args, "no_prefix_cache", False),
        stream_interval=getattr(args, "stream_interval", 1),
        step_log=step_log_dir(getattr(args, "step_log", None)),
        worker_id=getattr(args, "worker_id", None),
        drain_timeout_s=getattr(args, "drain_timeout", 30.0),
        curve_secret_key=getattr(args, "curve_key", None),
        curve_server_key=getattr(args, "broker_key", None),
    )


def worker_flags(cfg: WorkerConfig) -> list[str]:
    """`run.py worker` flags that give a worker started by another command (``serve``, the demo,
    the benchmark) this config, except where it connects (``--connect``: the launcher's) and its
    identity and keys: the one place that turns a worker's config back into its command line
    (``worker_config`` is its inverse; tests/cli checks the round trip)."""
    flags = ["--model", cfg.model, "--device", cfg.device, "--dtype", cfg.dtype]
    if cfg.kv_budget_bytes is not None:
        flags += ["--kv-budget", str(cfg.kv_budget_bytes)]
    if cfg.num_threads is not None:
        flags += ["--threads", str(cfg.num_threads)]
    if cfg.host_kv_budget_bytes is not None:
        flags += ["--host-kv-budget", str(cfg.host_kv_budget_bytes)]
    if not cfg.profile:
        flags.append("--no-profile")
    if cfg.peer_bind != WorkerConfig.peer_bind:
        flags += ["--peer-bind", cfg.peer_bind]
    if cfg.slowdown != 1.0:
        flags += ["--slowdown", str(cfg.slowdown)]
    if not cfg.prefix_cache:
        flags.append("--no-prefix-cache")
    if cfg.stream_interval != 1:
        flags += ["--stream-interval", str(cfg.stream_interval)]
    if cfg.step_log:
        flags += ["--step-log", cfg.step_log]
    return flags
