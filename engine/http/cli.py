"""`run.py http` (the gateway alone) and the gateway flags of `run.py serve`: flags, their
conversion into a GatewayConfig, and the child command line `serve` starts."""

from __future__ import annotations

import argparse
import sys

from engine.cli_args import add_curve_client_flags, connect_arg
from engine.cli_base import port, positive_float
from engine.http.config import GatewayConfig

DEFAULT_HTTP_PORT = 8000


def add_http_parser(p: argparse.ArgumentParser) -> None:
    """Flags of `run.py http`."""
    p.add_argument(
        "--connect",
        type=connect_arg("tcp://127.0.0.1:5555"),
        default="tcp://127.0.0.1:5555",
        help="the broker's client address, HOST:PORT or tcp://HOST:PORT",
    )
    p.add_argument(
        "--stats-connect",
        type=connect_arg("tcp://127.0.0.1:5557"),
        default=None,
        help="the broker's stats address (default: asked of the broker at --connect)",
    )
    p.add_argument("--bind", default="127.0.0.1", help="interface to listen on (loopback)")
    p.add_argument("--port", type=port, default=DEFAULT_HTTP_PORT, help="0: any free port")
    p.add_argument(
        "--model",
        default="embedded",
        help="the broker's --model: its tokenizer serves /tokenize and token counts (no weights)",
    )
    p.add_argument(
        "--metrics-only", action="store_true", help="serve only /metrics and /health (no API)"
    )
    p.add_argument(
        "--request-timeout",
        type=positive_float,
        default=600.0,
        help="seconds a request may run before the engine stops it",
    )
    _add_shared_flags(p)
    add_curve_client_flags(p)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `run.py serve` that start a gateway beside the engine."""
    g = p.add_argument_group("HTTP API and metrics (a gateway process beside the engine)")
    g.add_argument(
        "--http-port", type=port, default=None, help="serve the OpenAI-compatible API on this port"
    )
    g.add_argument(
        "--metrics-port",
        type=port,
        default=None,
        help="serve Prometheus /metrics on this port (without --http-port: metrics only)",
    )
    _add_shared_flags(g)


def _add_shared_flags(g) -> None:
    g.add_argument("--served-model-name", default=None, help="the model's name in the API")
    g.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require `Authorization: Bearer KEY` on the API (repeatable); visible in the "
        "process list, unlike --api-key-file",
    )
    g.add_argument("--api-key-file", default=None, help="API keys, one per line")


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The config of `run.py http`; raises ValueError with a one-line message."""
    from engine.http.auth import load_keys

    keys = tuple(args.api_key or ())
    if args.api_key_file:
        keys += load_keys(args.api_key_file)
    if any(not k.strip() or any(c.isspace() for c in k) for k in keys):
        raise ValueError("an API key must be non-empty and contain no spaces")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    return GatewayConfig(
        connect=args.connect,
        stats_connect=args.stats_connect,  # None: the gateway asks the broker, as `run.py tui`
        model=args.model,
        served_model_name=args.served_model_name,
        bind=args.bind,
        port=args.port,
        metrics_only=args.metrics_only,
        api_keys=keys,
        request_timeout_s=args.request_timeout,
        curve_secret_key=args.curve_key,
        curve_server_key=args.broker_key,
    )


def run_http(args: argparse.Namespace) -> int:
    from engine.http.auth import KeyFileError
    from engine.http.server import GatewayStartError, run_gateway

    try:
        cfg = gateway_config(args)
    except (KeyFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def announce(url: str) -> None:
        what = "Prometheus metrics at" if cfg.metrics_only else "OpenAI-compatible API at"
        print(f"http: {what} {url}{'' if cfg.metrics_only else '/v1'} (metrics {url}/metrics); "
              f"broker {cfg.connect}", flush=True)  # fmt: skip

    try:
        run_gateway(cfg, on_ready=announce)
    except GatewayStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def serve_gateway_argv(
    args: argparse.Namespace, addrs: dict[str, str], curve_args: list[str]
) -> list[list[str]]:
    """`run.py http` command lines for `serve --http-port/--metrics-port`: one per port;
    ``curve_args``: its client key with a CURVE broker."""
    wanted: list[tuple[int, bool]] = []
    if args.http_port is not None:
        wanted.append((args.http_port, False))
    if args.metrics_port is not None and args.metrics_port != args.http_port:
        wanted.append((args.metrics_port, True))
    common = [
        "--connect", addrs["clients"].replace("0.0.0.0", "127.0.0.1"),
        "--stats-connect", addrs["stats"].replace("0.0.0.0", "127.0.0.1"),
        "--bind", args.bind, "--model", args.model, "--log-level", args.log_level,
        "--log-format", getattr(args, "log_format", "text"),
    ]  # fmt: skip
    if args.served_model_name:
        common += ["--served-model-name", args.served_model_name]
    for key in args.api_key or ():
        common += ["--api-key", key]
    if args.api_key_file:
        common += ["--api-key-file", args.api_key_file]
    common += list(curve_args)
    return [
        ["http", *common, "--port", str(port), *(["--metrics-only"] if only else [])]
        for port, only in wanted
    ]
