"""Starts a worker process: threads, model, time profile (cached), executor, ZeroMQ loop."""

from __future__ import annotations

import logging
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import torch

from engine import protocol as p
from engine.config import DEFAULT_KV_BUDGET_BYTES, WorkerConfig
from engine.cost_model import CostModelError, TimeModel
from engine.models import models_cache_root
from engine.start_checks import check_kv_budget
from engine.worker.executor import Executor, cache_root
from engine.worker.kv_pool import DEFAULT_BLOCK_TOKENS
from engine.worker.kv_setup import kv_store_factory
from engine.worker.memory_probe import probe
from engine.worker.model_loader import LoadedModel, load_model
from engine.worker.runner import Runner
from engine.worker.worker import WorkerLoop, default_worker_id

log = logging.getLogger(__name__)

GPU_SAFETY_FRACTION = 0.9  # of the memory free after the weights, left for the KV cache


def set_threads(cfg: WorkerConfig) -> int:
    num_threads = cfg.num_threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set once in this process (tests); intra-op threads are what matter
    return num_threads


def kv_budget_bytes(cfg: WorkerConfig, device: torch.device) -> int:
    if cfg.kv_budget_bytes is not None:
        return cfg.kv_budget_bytes
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_SAFETY_FRACTION)
    return DEFAULT_KV_BUDGET_BYTES


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"{platform.machine()}-{platform.processor() or 'cpu'}"


def profile_path(loaded: LoadedModel, num_threads: int) -> Path:
    name = f"{loaded.info.name}-{_device_name(loaded.device)}-{loaded.dtype}-t{num_threads}.json"
    return models_cache_root().parent / "profiles" / name.replace("/", "_").replace("torch.", "")


def time_model(
    runner: Runner, loaded: LoadedModel, num_threads: int, use_cache: bool = True
) -> TimeModel:
    """The profiled time model, from the cache when this model, device and dtype were profiled."""
    from engine.worker.profiler import profile

    path = profile_path(loaded, num_threads)
    cached = TimeModel.load_cached(path) if use_cache else None
    if cached is not None:
        log.info("time model from %s", path)
        return cached
    log.info(
        "profiling %s on %s: the first start on this machine only (cached in %s)",
        loaded.info.name, loaded.device, path,
    )  # fmt: skip
    started_at = time.monotonic()
    prefill, decode = profile(runner, on_progress=progress_logger(started_at))
    model = TimeModel.fit(prefill, decode)
    model.save(path)
    log.info("profiled in %.1f s", time.monotonic() - started_at)
    return model


def progress_logger(started_at: float, every_s: float = 3.0) -> Callable[[int, int], None]:
    """A profiler progress callback: a log line every ``every_s`` seconds (a terminal shows
    the start is moving, a log file does not fill up)."""
    last = [started_at]

    def on_progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s and done < total:
            last[0] = now
            log.info("profiling: %d/%d shapes, %.0f s", done, total, now - started_at)

    return on_progress


def build(cfg: WorkerConfig) -> tuple[Callable[[], Executor], p.Ready]:
    """Load the model and profile it; returns a factory of fresh executors over the loaded model
    (one at start, one at every reset) and the worker's Ready."""
    num_threads = set_threads(cfg)
    loaded = load_model(cfg.model, cfg.device, cfg.dtype)
    runner = Runner(loaded, slowdown=cfg.slowdown)
    budget = kv_budget_bytes(cfg, loaded.device)
    check_kv_budget(loaded.info.kv_bytes_per_token, budget, max_gen_len=None)  # UsageError
    params = None
    if cfg.profile:
        try:
            params = time_model(runner, loaded, num_threads).to_params()
        except CostModelError as exc:
            log.warning("time profile unusable (%s); the broker uses default figures", exc)
    info = loaded.info
    ready = p.Ready(
        version=p.PROTOCOL_VERSION,
        worker_id=cfg.worker_id or default_worker_id(cfg.device),
        device=str(loaded.device) if loaded.device.type == "cpu" else _device_name(loaded.device),
        model=info.name,
        dtype=cfg.dtype,
        kv_bytes_per_token=info.kv_bytes_per_token,
        kv_budget_bytes=budget,
        max_context_len=info.max_context_len,
        eos_token_ids=list(info.eos_token_ids),
        mem_total_bytes=probe(loaded.device)[1],
        time_model=params,
        kv_block_tokens=DEFAULT_BLOCK_TOKENS,
        stream_interval=cfg.stream_interval,
    )
    make_store, kv_fields = kv_store_factory(cfg, loaded.device, params)

    def make_executor() -> Executor:
        return Executor(
            runner,
            budget,
            store=make_store(),
            prefix_cache=cfg.prefix_cache,
            stream_interval=cfg.stream_interval,
        )

    kv_fields["prefix_root"] = cache_root(runner, DEFAULT_BLOCK_TOKENS, cfg.prefix_cache)
    ready = msgspec.structs.replace(ready, **kv_fields)
    return make_executor, ready


def run_worker(cfg: WorkerConfig) -> int:
    make_executor, ready = build(cfg)
    stop, abort = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:  # the first drains, a second one leaves at once
        (abort if stop.is_set() else stop).set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "worker %s ready on %s: KV budget %.0f MiB; connecting to %s",
        ready.worker_id,
        ready.device,
        ready.kv_budget_bytes / 2**20,
        cfg.connect,
    )
    loop = WorkerLoop(cfg, make_executor, ready, lambda: probe(loop.executor.runner.device))
    loop.serve(stop, abort)
    return 1 if loop.compute.failed else 0


def run_profile(cfg: WorkerConfig) -> int:
    """`run.py profile`: measure, fit, report the error on shapes not used for fitting, cache."""
    from engine.worker import profiler

    num_threads = set_threads(cfg)
    loaded = load_model(cfg.model, cfg.device, cfg.dtype)
    runner = Runner(loaded)
    started_at = time.monotonic()
    prefill, decode = profiler.profile(runner, on_progress=progress_logger(started_at))
    profile_s = time.monotonic() - started_at
    test_pre = profiler.profile_prefill(runner, profiler.HELDOUT_PREFILL_GRID, seed=1)
    test_dec = profiler.profile_decode(runner, profiler.HELDOUT_DECODE_GRID, seed=1)
    model = TimeModel.fit(prefill, decode)
    print(
        f"profile: {len(prefill)} prefill + {len(decode)} decode shapes in {profile_s:.1f} s; "
        f"held-out MAPE: prefill {model.mape(test_pre, ()):.1%} over {len(test_pre)} shapes, "
        f"decode {model.mape((), test_dec):.1%} over {len(test_dec)} shapes"
    )
    path = profile_path(loaded, num_threads)
    model.save(path)
    print(f"time model saved to {path}: prefill {model.prefill}, decode {model.decode}")
    return 0
