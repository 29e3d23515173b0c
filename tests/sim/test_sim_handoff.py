"""A simulated handoff lands in the receiver's pool when it arrives, as the executor's does
(tests/handoff/test_executor_paths.py): parked KV that no waiting dispatch needs makes way, and
what the worker holds never exceeds its budget."""

from __future__ import annotations

import msgspec
from worker.helpers import make_item, make_run

from engine import protocol as p
from engine.cost_model import TimeModel
from engine.sim.devices import DeviceModel, ProfileTimer
from engine.sim.worker import BLOCK_TOKENS, SimWorker

KVPT = 1024  # bytes of KV per token
SLICE, NUM_TOKENS = 4, 12


def worker(name: str, budget: int, peers: dict[str, SimWorker]) -> SimWorker:
    time = TimeModel.default()
    device = DeviceModel(
        name="tiny", model="tiny", timer=ProfileTimer(time), time_model=time,
        kv_bytes_per_token=KVPT, kv_budget_bytes=budget, max_context_len=4096,
        copy_bytes_per_s=1e9, transfer_bytes_per_s=1e9, transfer_latency_s=0.01,
        host_kv_budget_bytes=0,
    )  # fmt: skip
    peers[name] = SimWorker(name, device, peers.get)
    return peers[name]


def item(rid: str, length: int, done: int, source: str = "") -> p.BatchItem:
    tokens = [3 + i % 100 for i in range(length + done)]
    made = make_item(
        rid, tokens, max_steps=SLICE, max_new_tokens=NUM_TOKENS - done, num_generated=done,
        keep_kv=True,
    )  # fmt: skip
    return msgspec.structs.replace(made, kv_source=source)


def drive(w: SimWorker, now: float, msgs: list) -> float:
    """Step ``w`` until it has nothing to do; every message it sent goes to ``msgs``."""
    while (wake := w.next_wake_at(now)) is not None:
        end = w.start_step(max(now, wake))
        if end is None:
            msgs += w.flush(max(now, wake))
            now = max(now, wake)
            continue
        now = end
        msgs += w.end_step(now)
        assert w.pool.used_bytes + w.store.staged_bytes <= w.device.kv_budget_bytes
    return now


def test_an_arrival_lands_in_the_pool_evicting_parked_kv_no_waiting_dispatch_needs() -> None:
    peers: dict[str, SimWorker] = {}
    a = worker("a", 1 << 30, peers)
    b = worker("b", 5 * BLOCK_TOKENS * KVPT, peers)  # "b" and "d" park in 3 blocks, "c" needs 3
    msgs: list = []
    a.command(make_run(1, [item("c", 40, 0)]), 0.0)
    now = drive(a, 0.0, msgs)
    b.command(make_run(2, [item("b", 17, 0)]), now)
    now = drive(b, now, msgs)
    b.command(make_run(3, [item("d", 9, 0)]), now)
    now = drive(b, now, msgs)
    assert b.pool.num_free == 2 and "b" in b.store and "d" in b.store
    b.command(make_run(4, [item("c", 40, SLICE, source="a")]), now)
    b.command(make_run(5, [item("b", 17, SLICE)]), now)
    msgs.clear()
    drive(b, now, msgs)
    evicted = [rid for m in msgs if isinstance(m, p.KVEvicted) for rid in m.request_ids]
    assert evicted == ["d"]  # older "b" was waited for here
    done = {m.batch_id: m for m in msgs if isinstance(m, p.BatchDone)}
    assert done[4].handoff_tokens == done[4].reused_kv_tokens == 40 + SLICE - 1
    assert done[4].handoff_bytes == (40 + SLICE - 1) * KVPT  # what moved, not whole blocks
    assert done[5].reused_kv_tokens == 17 + SLICE - 1 and done[5].recomputed_tokens == 0


def test_an_arrival_the_pool_cannot_take_waits_beside_it_rather_than_evicting_itself() -> None:
    """ "c" (55 tokens) needs 4 blocks where 2 are free and "d" holds 1: making way cannot
    succeed, and the arrival, parked like the others, must not be what is evicted."""
    peers: dict[str, SimWorker] = {}
    a = worker("a", 1 << 30, peers)
    b = worker("b", 5 * BLOCK_TOKENS * KVPT, peers)
    msgs: list = []
    a.command(make_run(1, [item("c", 52, 0)]), 0.0)
    now = drive(a, 0.0, msgs)
    for batch_id, (rid, length) in enumerate((("b", 17), ("d", 9)), start=2):
        b.command(make_run(batch_id, [item(rid, length, 0)]), now)
        now = drive(b, now, msgs)
    b.command(make_run(4, [item("c", 52, SLICE, source="a")]), now)
    b.command(make_run(5, [item("b", 17, SLICE)]), now)
    msgs.clear()
    drive(b, now, msgs)
    done = {m.batch_id: m for m in msgs if isinstance(m, p.BatchDone)}
    assert done[4].handoff_tokens == 52 + SLICE - 1 and done[4].recomputed_tokens == 0
