"""The block pool: no block owned twice, every block freed exactly once, never over budget,
and consecutive blocks preferred (so that attention reads a row in place)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.worker.kv_pool import BlockTable, KVLayout, KVPool

LAYOUT = KVLayout(2, 2, 4, torch.float32, torch.device("cpu"))


def pool_of(num_blocks: int, block_tokens: int = 4) -> KVPool:
    return KVPool(LAYOUT, num_blocks * block_tokens * LAYOUT.bytes_per_token, block_tokens)


ops = st.lists(
    st.tuples(st.sampled_from(["grow", "trim", "free"]), st.integers(0, 7), st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 24), script=ops)
def test_blocks_are_owned_once_freed_once_and_within_budget(num_blocks, script):
    pool = pool_of(num_blocks)
    tables = [BlockTable() for _ in range(8)]
    for op, which, num_tokens in script:
        table = tables[which]
        before = list(table.blocks)
        if op == "grow":
            ok = pool.allocate(table, num_tokens)
            if ok:
                assert len(table.blocks) >= pool.blocks_for(num_tokens)
                assert table.blocks[: len(before)] == before  # it only grows at the end
            else:
                assert table.blocks == before  # all or nothing
        elif op == "trim":
            pool.free(table, keep_tokens=num_tokens)
            assert len(table.blocks) == min(len(before), pool.blocks_for(num_tokens))
        else:
            pool.free(table)
            assert table.blocks == []
        owned = [b for t in tables for b in t.blocks]
        assert len(owned) == len(set(owned)), "a block owned twice"
        assert all(0 <= b < pool.num_blocks for b in owned)
        assert pool.num_free == pool.num_blocks - len(owned)
        assert pool.used_bytes <= num_blocks * pool.block_bytes
    for table in tables:
        pool.free(table)
    assert pool.num_free == pool.num_blocks


def test_freeing_a_block_twice_is_an_error():
    pool = pool_of(4)
    table = BlockTable()
    assert pool.allocate(table, 8)
    stale = BlockTable(list(table.blocks))
    pool.free(table)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(stale)


def test_allocation_prefers_consecutive_blocks():
    pool = pool_of(16)
    a, b, c = BlockTable(), BlockTable(), BlockTable()
    assert pool.allocate(a, 8) and pool.allocate(b, 4) and pool.allocate(c, 12)
    pool.free(b)  # a hole of one block between a and c
    d = BlockTable()
    assert pool.allocate(d, 12)  # best fit: the run after c, not the hole
    assert len(d.runs(4, 12)) == 1
    assert pool.allocate(a, 12)  # a grows into the hole right after its last block
    assert len(a.runs(4, 12)) == 1


def test_read_and_write_move_kv_exactly():
    pool = pool_of(8)
    src, dst = BlockTable(), BlockTable()
    assert pool.allocate(src, 10) and pool.allocate(dst, 10)
    layers = [(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)) for _ in range(2)]
    pool.write(src, layers)
    assert src.num_tokens == 10
    pool.write(dst, pool.read(src))
    for (k, v), (k2, v2) in zip(layers, pool.read(dst), strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
