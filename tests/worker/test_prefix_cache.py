"""Prefix caching in the worker: shared blocks are reference-counted and freed by their last
user; unused named blocks stay cached until the pool needs the room (least recently used
first); a request whose prompt starts like an earlier one reuses its blocks and computes the
same greedy tokens (float32) as without the cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.prefix_hash import block_hashes, prefix_root
from engine.worker.executor import Executor
from engine.worker.kv_pool import BlockTable, KVLayout, KVPool
from tests.worker.helpers import BIG_BUDGET, drain, make_item, make_prompts, make_run

LAYOUT = KVLayout(2, 2, 4, torch.float32, torch.device("cpu"))
ROOT = prefix_root("t", "float32", 4)


def pool_of(num_blocks: int) -> KVPool:
    return KVPool(LAYOUT, num_blocks * 4 * LAYOUT.bytes_per_token, 4)


def filled(pool: KVPool, tokens: list[int]) -> tuple[BlockTable, list[bytes]]:
    """A table holding ``tokens`` (KV as if written), its full blocks named."""
    table = BlockTable()
    assert pool.allocate(table, len(tokens))
    table.num_tokens = len(tokens)
    names = block_hashes(tokens, 4, ROOT)
    pool.register(table, names)
    return table, names


def test_a_shared_block_is_freed_only_by_its_last_user():
    pool = pool_of(8)
    first, names = filled(pool, list(range(10)))  # 3 blocks, 2 of them full and named
    assert pool.take_events() == (names, [])
    second = BlockTable()
    assert pool.share_prefix(second, names) == 8
    assert second.blocks == first.blocks[:2]
    assert pool.num_free == 5  # a shared block counts once
    pool.free(first)
    assert pool.num_free == 6 and pool.num_cached == 0  # the shared ones are still in use
    pool.free(second)
    assert pool.num_cached == 2 and pool.num_free == 8  # unused now, still named
    third = BlockTable()
    assert pool.share_prefix(third, names) == 8 and pool.num_cached == 0


def test_cached_blocks_give_way_tails_first_and_in_runs():
    """Unused named blocks are evicted only for room: a chain's tail before its head (its head
    alone is still a hit), and, when no free run holds a new table, the run of blocks cached
    longest ago, so that the table stays in one run."""
    pool = pool_of(4)
    a, names_a = filled(pool, list(range(16)))  # 4 full blocks
    pool.free(a)
    pool.take_events()
    one = BlockTable()
    assert pool.allocate(one, 4)
    assert pool.take_events() == ([], [names_a[3]])  # the tail went
    assert pool.cached_prefix_blocks(names_a) == 3

    pool = pool_of(6)
    a, names_a = filled(pool, list(range(8)))  # blocks 0, 1
    b, names_b = filled(pool, list(range(100, 108)))  # blocks 2, 3; 4 and 5 free
    pool.free(a)
    pool.free(b)
    c = BlockTable()
    assert pool.allocate(c, 12)  # 3 blocks: no free run of 3; b's tail and the free 4, 5
    assert c.blocks == [3, 4, 5]
    assert pool.cached_prefix_blocks(names_b) == 1 and pool.cached_prefix_blocks(names_a) == 2


@settings(max_examples=150, deadline=None)
@given(
    script=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(1, 24)), max_size=50
    )
)
def test_eviction_never_frees_a_block_in_use(script):
    """Tables sharing prefixes come and go; a block some table holds is never handed out again,
    and every block is free, cached or held, never two of them."""
    pool = pool_of(12)
    tables: dict[int, BlockTable] = {}
    prefixes = [[p * 1000 + i for i in range(24)] for p in range(4)]
    for which, prefix, num_tokens in script:
        table = tables.pop(which, None)
        if table is not None:
            pool.free(table)
            continue
        tokens = prefixes[prefix][:num_tokens]
        table = BlockTable()
        names = block_hashes(tokens, 4, ROOT)
        pool.share_prefix(table, names)
        if not pool.allocate(table, num_tokens):
            pool.free(table)
            continue
        table.num_tokens = num_tokens
        pool.register(table, names)
        tables[which] = table
        held = [b for t in tables.values() for b in t.blocks]
        counts = {b: held.count(b) for b in held}
        for b, n in counts.items():
            assert pool._refs[b] == n and not pool._free[b] and b not in pool._cached
        assert pool.num_free == pool.num_blocks - len(counts)


def run_one(executor: Executor, batch_id: int, rid: str, prompt: list[int], steps: int):
    executor.submit(make_run(batch_id, [make_item(rid, prompt, max_steps=steps)]))
    return drain(executor)


def test_a_repeated_prefix_is_reused_and_greedy_tokens_do_not_change(runner):
    system = make_prompts(40, [45])[0]  # 2 full blocks of 16 and a partial one
    asks = make_prompts(41, [7, 20])
    cached, plain = Executor(runner, BIG_BUDGET), Executor(runner, BIG_BUDGET, prefix_cache=False)
    for i, ask in enumerate(asks):
        with_cache = run_one(cached, i + 1, f"r{i}", system + ask, 12)
        without = run_one(plain, i + 1, f"r{i}", system + ask, 12)
        assert with_cache.tokens == without.tokens
        done = with_cache.done[i + 1]
        assert done.prefix_query_tokens == len(system) + len(ask) - 1
        assert done.prefix_hit_tokens == (0 if i == 0 else 32)  # the system prompt's full blocks
        assert done.prefill_tokens == done.prefix_query_tokens - done.prefix_hit_tokens
        assert with_cache.released[f"r{i}"].cached_tokens == done.prefix_hit_tokens
        assert without.done[i + 1].prefix_hit_tokens == 0
    assert cached.prefix_root and not plain.prefix_root


def test_a_whole_context_in_the_cache_decodes_at_once(runner):
    """A context of exactly full blocks (plus the token the step feeds) needs no prefill."""
    prompt = make_prompts(42, [33])[0]
    executor = Executor(runner, BIG_BUDGET)
    first = run_one(executor, 1, "a", prompt, 6)
    again = run_one(executor, 2, "b", prompt, 6)
    assert again.tokens["b"] == first.tokens["a"]
    assert again.done[2].prefix_hit_tokens == 32 and again.done[2].prefill_tokens == 0


def test_generated_tokens_are_cached_for_the_next_turn(runner):
    """A chat's next turn resends the conversation: the blocks the last answer filled are hits."""
    prompt = make_prompts(43, [20])[0]
    executor = Executor(runner, BIG_BUDGET)
    turn = run_one(executor, 1, "t1", prompt, 30)
    history = prompt + turn.tokens["t1"]  # 50 tokens: 3 full blocks
    follow = make_prompts(44, [5])[0]
    nxt = run_one(executor, 2, "t2", history + follow, 4)
    assert nxt.done[2].prefix_hit_tokens == 48
    reference = run_one(
        Executor(runner, BIG_BUDGET, prefix_cache=False), 1, "t2", history + follow, 4
    )
    assert nxt.tokens["t2"] == reference.tokens["t2"]


def test_block_events_tell_the_broker_what_is_cached(runner):
    executor = Executor(runner, 4 * 16 * runner.info.kv_bytes_per_token)  # 4 blocks
    prompts = make_prompts(45, [40, 40])
    stored, removed = set(), set()

    def step_all(batch_id, rid, prompt):
        executor.submit(make_run(batch_id, [make_item(rid, prompt, max_steps=2)]))
        while executor.has_work():
            out = executor.step()
            if out.blocks is not None:
                stored.update(out.blocks.stored)
                stored.difference_update(out.blocks.removed)
                removed.update(out.blocks.removed)

    step_all(1, "a", prompts[0])
    names_a = block_hashes(prompts[0], 16, executor.prefix_root)
    assert set(names_a) <= stored  # 2 full blocks of the prompt
    step_all(2, "b", prompts[1])  # needs 3 blocks: a's cached ones must give way
    assert removed & set(names_a)
    held = {n for n in stored if n in executor.pool._block_of}
    assert held == stored  # the broker's view is the pool's


@pytest.mark.parametrize("step_tokens", [512, 40])
def test_rows_that_start_together_compute_a_shared_prefix_once(runner, step_tokens):
    """Three requests with the same new 40-token prefix in one dispatch: the oldest computes
    it, the others wait and take its blocks as they are completed (chunks of 16 in steps of
    40 tokens: block by block); tokens as without the cache."""
    system = make_prompts(46, [40])[0]
    tails = make_prompts(47, [9, 13, 30])
    items = [make_item(f"r{i}", system + t, max_steps=10) for i, t in enumerate(tails)]
    chunks = {"max_step_tokens": step_tokens, "prefill_chunk_tokens": min(256, step_tokens // 2)}
    cached = Executor(runner, BIG_BUDGET, **chunks)
    cached.submit(make_run(1, items))
    together = drain(cached)
    plain = Executor(runner, BIG_BUDGET, prefix_cache=False, **chunks)
    plain.submit(make_run(1, items))
    reference = drain(plain)
    assert together.tokens == reference.tokens
    done = together.done[1]
    assert done.prefix_hit_tokens == 2 * 32  # two full blocks each for r1 and r2
    assert done.prefill_tokens == reference.done[1].prefill_tokens - 64
    assert [together.released[f"r{i}"].cached_tokens for i in range(3)] == [0, 32, 32]
