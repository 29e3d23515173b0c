"""How a worker process sets up its KV store and its handoffs: the host tier's budget, the rule
that decides whether offloading evicted KV beats recomputing it, the measured copy and transfer
bandwidths it announces in Ready, and the handoff thread beside its compute thread."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
import torch
import zmq

from engine import protocol as p
from engine.config import WorkerConfig
from engine.cost_model import TimeModel
from engine.worker import kv_wire
from engine.worker.handoff import DEFAULT_PEER_BIND, HandoffThread, measure_copy_bytes_per_s
from engine.worker.kv_store import KVStore

log = logging.getLogger(__name__)

DEFAULT_HOST_KV_BUDGET_BYTES = 2 * 1024**3


def host_kv_budget_bytes(cfg: WorkerConfig) -> int:
    budget = cfg.host_kv_budget_bytes
    return DEFAULT_HOST_KV_BUDGET_BYTES if budget is None else budget


def offload_pays(time: TimeModel, copy_bytes_per_s: float) -> Callable[[int, int], bool]:
    """Offload evicted KV when copying it out and back costs less than prefilling it again."""

    def pays(num_tokens: int, nbytes: int) -> bool:
        return 2 * nbytes / copy_bytes_per_s < float(time.row_prefill_s(num_tokens))

    return pays


def kv_store_factory(
    cfg: WorkerConfig, device: torch.device, time_params: p.TimeModelParams | None
) -> tuple[Callable[[], KVStore], dict[str, Any]]:
    """A factory of fresh stores (one per executor) and the Ready fields that describe them."""
    pin = device.type == "cuda"
    host_budget = host_kv_budget_bytes(cfg)
    copy_rate = measure_copy_bytes_per_s(device, pin=pin)
    time = TimeModel.default() if time_params is None else TimeModel.from_params(time_params)
    rule = offload_pays(time, copy_rate)
    fields = {"host_kv_budget_bytes": host_budget, "copy_bytes_per_s": copy_rate}
    return lambda: KVStore(host_budget, pin_memory=pin, offload_pays=rule), fields


def attach_handoffs(
    ctx: zmq.Context, compute: Any, ready: p.Ready, cfg: WorkerConfig
) -> tuple[HandoffThread, p.Ready]:
    """A handoff thread serving the compute thread's current store and delivering arrivals to
    its command queue (not started), and ``ready`` with its address and measured bandwidth."""
    executor = compute.executor
    info, layout = executor.runner.info, executor.runner.layout
    shape = kv_wire.KVShape(
        info.num_layers, info.num_kv_heads, info.head_dim, layout.dtype, executor.kv_budget_bytes
    )
    bind = cfg.peer_bind or DEFAULT_PEER_BIND
    thread = HandoffThread(
        ctx, lambda: compute.executor.kv_store, shape, compute.commands.put, bind=bind
    )
    try:
        measured = thread.probe()
        rates = {"transfer_bytes_per_s": measured.transfer_bytes_per_s}
        rates["transfer_latency_s"] = measured.transfer_latency_s
    except TimeoutError as exc:
        log.warning("handoff bandwidth probe failed (%s); the broker assumes defaults", exc)
        rates = {}
    log.info("handoffs: peers pull KV from %s (%s)", thread.peer_addr, rates)
    return thread, msgspec.structs.replace(ready, peer_addr=thread.peer_addr, **rates)
