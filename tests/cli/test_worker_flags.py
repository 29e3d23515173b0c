"""One function turns a worker's config into its command line (serve, the demo and the
benchmark all use it): parsing those flags gives the same config back."""

from __future__ import annotations

import dataclasses

import pytest

from engine import cli_args
from engine.cli import build_parser
from engine.config import WorkerConfig

CONFIGS = [
    WorkerConfig(),
    WorkerConfig(
        model="/models/m",
        device="cuda:1",
        dtype="bfloat16",
        kv_budget_bytes=48 << 20,
        num_threads=3,
        host_kv_budget_bytes=0,
        profile=False,
        peer_bind="tcp://0.0.0.0:*",
        slowdown=2.0,
        prefix_cache=False,
        stream_interval=4,
        step_log="/tmp/steps",
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_worker_flags_round_trip(cfg: WorkerConfig) -> None:
    argv = ["worker", "--connect", cfg.connect, *cli_args.worker_flags(cfg)]
    args = build_parser().parse_args(argv)
    back = cli_args.worker_config(args, args.connect, args.device, args.threads)
    fields = ("model", "device", "dtype", "kv_budget_bytes", "num_threads")
    fields += ("host_kv_budget_bytes", "profile", "peer_bind", "slowdown", "prefix_cache")
    fields += ("step_log", "stream_interval")
    assert {f: getattr(back, f) for f in fields} == {f: getattr(cfg, f) for f in fields}, (
        dataclasses.asdict(back)
    )


def test_bench_starts_its_workers_with_its_stream_interval() -> None:
    """bench takes the worker flags; --stream-interval reaches the workers it starts."""
    from engine.bench.cli import _settings
    from engine.bench.runner import worker_args

    args = build_parser().parse_args(["bench", "--policies", "scls", "--stream-interval", "4"])
    settings = _settings(args)
    flags = worker_args(settings, "scls")
    assert flags[flags.index("--stream-interval") + 1] == "4"
    assert settings.describe()["stream_interval"] == 4  # results.json records it
