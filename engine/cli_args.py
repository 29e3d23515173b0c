"""Command-line flags shared by the subcommands, and their conversion into component configs."""

from __future__ import annotations

import argparse
import re

from engine.config import BrokerConfig, SchedulerConfig, WorkerConfig

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
}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use bytes or a unit, e.g. 512MiB or 2GiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_scheduler_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("scheduling")
    g.add_argument("--policy", choices=["scls", "scls:strict", "ils", "sls"], default="scls")
    g.add_argument("--slice-len", type=int, default=64, help="SCLS: decode steps per slice (S)")
    g.add_argument(
        "--max-gen-len", type=int, default=1024, help="maximal generation length L (tokens)"
    )
    g.add_argument(
        "--kv-mode",
        choices=["auto", "keep", "recompute"],
        default="auto",
        help="between slices: auto (the cheapest of keeping, offloading, handing off to another "
        "worker or recomputing each KV cache), keep (on its worker), or recompute (re-prefill)",
    )
    g.add_argument("--ils-admission", choices=["reserve", "optimistic"], default="reserve")
    g.add_argument(
        "--max-concurrency", type=int, default=None, help="ILS: cap on running requests per worker"
    )
    g.add_argument("--max-batch-size", type=int, default=256)


def add_broker_flags(ap: argparse.ArgumentParser) -> None:
    """Reliability and security of a broker: queue bound, grace, drain, CURVE."""
    g = ap.add_argument_group("reliability and security")
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=4096,
        help="accepted, unfinished requests beyond which a Submit is refused 'overloaded' (0: no limit)",
    )
    g.add_argument(
        "--max-queued-tokens",
        type=int,
        default=0,
        help="prompt plus max_tokens of accepted, unfinished requests beyond which a Submit is "
        "refused 'overloaded' (0: no limit)",
    )
    g.add_argument(
        "--client-grace",
        type=float,
        default=5.0,
        help="seconds a closed client connection's requests run on, so that it can resume them",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
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


def add_curve_client_flags(ap: argparse.ArgumentParser) -> None:
    """A peer of a CURVE broker: its own key pair and the broker's public key."""
    g = ap.add_argument_group("CURVE (with a broker started with --curve)")
    g.add_argument(
        "--curve-key", metavar="FILE", default=None, help="this peer's *.key_secret file"
    )
    g.add_argument(
        "--broker-key", metavar="FILE", default=None, help="the broker's broker.key file"
    )


def add_worker_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("worker")
    g.add_argument(
        "--model",
        default="embedded",
        help='"embedded" (SmolLM2-135M-Instruct), a transformers model directory, or a .gguf file',
    )
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    g.add_argument(
        "--kv-budget",
        type=parse_bytes,
        default=None,
        help="KV-cache budget per worker, e.g. 512MiB (CPU default 2GiB; GPU: free memory)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch threads per worker (CPU)")
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
        default="tcp://127.0.0.1:*",
        help="where this worker serves KV caches to other workers (port * picks a free one)",
    )
    g.add_argument("--slowdown", type=float, default=1.0, help=argparse.SUPPRESS)  # benchmarks


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    for name in ("slice_len", "max_gen_len", "max_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    return SchedulerConfig(
        policy=args.policy,
        slice_len=args.slice_len,
        max_gen_len=args.max_gen_len,
        kv_mode=args.kv_mode,
        ils_admission=args.ils_admission,
        max_concurrency=args.max_concurrency,
        max_batch_size=args.max_batch_size,
    )


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
    )


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
        profile=not args.no_profile,
        host_kv_budget_bytes=getattr(args, "host_kv_budget", None),
        peer_bind=getattr(args, "peer_bind", None) or "tcp://127.0.0.1:*",
        slowdown=getattr(args, "slowdown", 1.0),
        worker_id=getattr(args, "worker_id", None),
        drain_timeout_s=getattr(args, "drain_timeout", 30.0),
        curve_secret_key=getattr(args, "curve_key", None),
        curve_server_key=getattr(args, "broker_key", None),
    )
