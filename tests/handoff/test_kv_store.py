"""The tiered KV store: device and host tiers, exact byte accounting, LRU eviction that falls
back to recompute, and the offload-or-drop choice."""

from __future__ import annotations

import threading

import torch

from engine.worker.kv_store import KVStore, layers_nbytes

LAYERS, HEADS, DIM = 3, 2, 4
TOKEN_BYTES = 2 * LAYERS * HEADS * DIM * 4  # float32 k and v over all layers


def kv(num_tokens: int, fill: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (1, HEADS, num_tokens, DIM)
    return [(torch.full(shape, fill), torch.full(shape, -fill)) for _ in range(LAYERS)]


def park(store: KVStore, request_id: str, num_tokens: int) -> int:
    return store.park(request_id, list(range(num_tokens)), kv(num_tokens))


def test_park_take_and_drop_count_every_byte() -> None:
    store = KVStore(host_budget_bytes=10_000)
    assert park(store, "a", 10) == 10 * TOKEN_BYTES == layers_nbytes(kv(10))
    park(store, "b", 5)
    assert store.parked_bytes == 15 * TOKEN_BYTES and store.host_bytes == 0
    park(store, "a", 7)  # replaces the older entry of "a"
    assert store.parked_bytes == 12 * TOKEN_BYTES and len(store) == 2
    entry = store.take("a")
    assert entry is not None and entry.token_ids == tuple(range(7)) and entry.tier == "device"
    assert store.parked_bytes == 5 * TOKEN_BYTES
    assert store.drop("b") and not store.drop("b")
    assert store.parked_bytes == 0 and len(store) == 0


def test_offload_moves_to_the_host_tier_and_lru_eviction_falls_back_to_recompute() -> None:
    store = KVStore(host_budget_bytes=25 * TOKEN_BYTES)
    for rid, n in [("a", 10), ("b", 10), ("c", 10)]:
        park(store, rid, n)
    moved = store.evict_for(15 * TOKEN_BYTES)  # oldest first: a then b
    assert (moved.offloaded, moved.dropped) == (["a", "b"], [])
    assert store.tier_of("a") == "host" and store.tier_of("c") == "device"
    assert (store.parked_bytes, store.host_bytes) == (10 * TOKEN_BYTES, 20 * TOKEN_BYTES)
    moved = store.offload("c")  # the host holds 25 tokens: a (least recently used) goes
    assert (moved.offloaded, moved.dropped) == (["c"], ["a"])
    assert store.request_ids("host") == ["b", "c"] and "a" not in store
    assert (store.parked_bytes, store.host_bytes) == (0, 20 * TOKEN_BYTES)
    entry = store.take("b")
    assert entry is not None and entry.tier == "host" and store.host_bytes == 10 * TOKEN_BYTES
    park(store, "big", 30)  # more than the whole host budget: dropped, not offloaded
    assert store.evict_for(1).dropped == ["big"] and store.host_bytes == 10 * TOKEN_BYTES


def test_offload_only_where_it_pays_and_never_protected_entries() -> None:
    store = KVStore(host_budget_bytes=10**9, offload_pays=lambda tokens, nbytes: tokens >= 8)
    park(store, "short", 4)
    park(store, "long", 8)
    park(store, "mine", 8)
    moved = store.evict_for(10**9, protect={"mine"})
    assert (moved.offloaded, moved.dropped) == (["long"], ["short"])
    assert store.tier_of("mine") == "device"
    assert not KVStore().evict_for(10)  # nothing to evict


def test_concurrent_takes_hand_each_entry_out_once() -> None:
    store = KVStore(host_budget_bytes=10**9)
    for i in range(200):
        park(store, f"r{i}", 2)
    store.evict_for(100 * 2 * TOKEN_BYTES)  # half of them on the host tier
    got: list[list[str]] = [[], []]

    def taker(out: list[str]) -> None:
        for i in range(200):
            if store.take(f"r{i}") is not None:
                out.append(f"r{i}")

    threads = [threading.Thread(target=taker, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(got[0] + got[1]) == sorted(f"r{i}" for i in range(200))
    assert (store.parked_bytes, store.host_bytes, len(store)) == (0, 0, 0)
