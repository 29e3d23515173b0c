"""Real engines for tests: a broker on a thread, worker processes, loopback sockets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from engine.config import BrokerConfig, SchedulerConfig
from engine.launcher import LocalEngine

ANY_PORT = "tcp://127.0.0.1:*"


@contextlib.contextmanager
def local_engine(
    model_dir, num_workers: int = 2, kv_budget: str = "64MiB", extra_worker_args=(), **sched
) -> Iterator[LocalEngine]:
    cfg = BrokerConfig(
        client_addr=ANY_PORT,
        worker_addr=ANY_PORT,
        stats_addr=ANY_PORT,
        model=str(model_dir),
        stats_interval_s=0.1,
        scheduler=SchedulerConfig(**sched),
    )
    worker_args = [
        "--model",
        str(model_dir),
        "--threads",
        "1",
        "--no-profile",
        "--kv-budget",
        kv_budget,
        *extra_worker_args,
    ]
    with LocalEngine(
        cfg, num_workers=num_workers, worker_args=worker_args, start_timeout_s=90
    ) as engine:
        yield engine
