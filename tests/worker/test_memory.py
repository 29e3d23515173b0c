"""The memory guard (eviction of parked KV, preemption) and the KV store's accounting."""

from __future__ import annotations

import torch

from engine.worker.executor import Executor
from engine.worker.kv_store import KVStore

from .helpers import Trace, drain, make_item, make_prompts, make_run, solo_greedy


def step_checked(executor: Executor, trace: Trace, budget: int) -> None:
    while executor.has_work():
        trace.record(executor, executor.step())
        assert executor.kv_used_bytes <= budget


def test_preemption_keeps_optimistic_joins_within_budget(runner):
    kvpt = runner.info.kv_bytes_per_token
    budget = 2 * 60 * kvpt  # two rows of 60 tokens; three rows of 50 do not fit
    prompts = make_prompts(30, [10, 10, 10])
    executor = Executor(runner, budget, block_tokens=4)
    for i, prompt in enumerate(prompts):
        executor.submit(make_run(i + 1, [make_item(f"r{i}", prompt, max_steps=40)], join=True))
    trace = Trace()
    step_checked(executor, trace, budget)
    assert trace.released["r2"].reason == "preempted"  # the newest goes first
    assert not trace.released["r2"].kv_kept
    assert [trace.released[f"r{i}"].reason for i in (0, 1)] == ["budget", "budget"]
    assert all(d.measured_peak_bytes <= budget for d in trace.done.values())
    assert max(d.measured_peak_bytes for d in trace.done.values()) > budget // 2

    generated = trace.tokens["r2"]  # resume the preempted request where it stopped
    assert 0 < len(generated) < 40
    item = make_item(
        "r2", prompts[2] + generated, max_steps=40 - len(generated), num_generated=len(generated)
    )
    executor.submit(make_run(9, [item]))
    resumed = drain(executor)
    assert generated + resumed.tokens["r2"] == solo_greedy(runner, prompts[2], 40)
    # its full blocks stayed in the prefix cache after the preemption: only the rest is prefilled
    done = resumed.done[9]
    assert done.prefix_hit_tokens > 0
    assert done.prefill_tokens + done.prefix_hit_tokens == len(prompts[2]) + len(generated) - 1
    assert done.recomputed_tokens == min(len(generated) - 1, done.prefill_tokens)
    for i in (0, 1):
        assert trace.tokens[f"r{i}"] == solo_greedy(runner, prompts[i], 40)


def test_sequential_batch_evicts_parked_kv_oldest_first(runner):
    kvpt = runner.info.kv_bytes_per_token
    budget = 100 * kvpt
    prompts = make_prompts(31, [20, 20, 30])
    executor = Executor(runner, budget, block_tokens=4)
    for i, rid in enumerate(["old", "new"]):
        executor.submit(make_run(i + 1, [make_item(rid, prompts[i], max_steps=4, keep_kv=True)]))
        drain(executor)
    assert executor.kv_store.request_ids() == ["old", "new"]
    assert executor.kv_parked_bytes == 2 * 24 * kvpt  # 23 tokens each, in blocks of 4
    # needs 30 - 1 + 40 = 69 tokens (18 blocks): 13 free, so one parked entry must go
    executor.submit(make_run(3, [make_item("big", prompts[2], max_steps=40)]))
    trace = Trace()
    step_checked(executor, trace, budget)
    assert trace.evicted == ["old"] and executor.kv_store.request_ids() == ["new"]
    assert trace.released["big"].reason == "budget"
    assert trace.done[3].measured_peak_bytes <= budget


def test_evicted_request_recomputes_to_the_same_tokens(runner):
    kvpt = runner.info.kv_bytes_per_token
    prompts = make_prompts(32, [15, 40])
    expected = solo_greedy(runner, prompts[0], 10)
    executor = Executor(runner, 60 * kvpt)
    executor.submit(make_run(1, [make_item("a", prompts[0], max_steps=5, keep_kv=True)]))
    first = drain(executor).tokens["a"]
    executor.submit(make_run(2, [make_item("b", prompts[1], max_steps=15)]))
    assert drain(executor).evicted == ["a"]
    item = make_item("a", prompts[0] + first, max_steps=5, num_generated=5, keep_kv=True)
    executor.submit(make_run(3, [item]))
    trace = drain(executor)
    assert first + trace.tokens["a"] == expected
    assert trace.done[3].reused_kv_tokens == 0 and trace.done[3].recomputed_tokens == 4


def test_join_step_evicts_parked_kv_before_preempting(runner):
    kvpt = runner.info.kv_bytes_per_token
    prompts = make_prompts(33, [10, 10])
    executor = Executor(runner, 50 * kvpt)
    executor.submit(make_run(1, [make_item("p", prompts[0], max_steps=3, keep_kv=True)]))
    drain(executor)
    executor.submit(make_run(2, [make_item("a", prompts[1], max_steps=30)], join=True))
    trace = drain(executor)
    assert trace.evicted == ["p"] and trace.released["a"].reason == "budget"


def test_a_request_larger_than_the_budget_is_an_error(runner):
    kvpt = runner.info.kv_bytes_per_token
    executor = Executor(runner, 20 * kvpt, block_tokens=4)
    prompts = make_prompts(34, [30, 5])
    executor.submit(make_run(1, [make_item("huge", prompts[0])], join=True))
    executor.submit(make_run(2, [make_item("grows", prompts[1], max_steps=40)], join=True))
    trace = drain(executor)
    assert (
        trace.released["huge"].reason == "error" and "--kv-budget" in trace.released["huge"].message
    )
    assert trace.released["grows"].reason == "error"
    assert len(trace.tokens["grows"]) == 20 - 5 + 1  # it ran until its own growth hit the budget
    assert executor.kv_used_bytes == 0


def kv(num_tokens: int, num_layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.ones(1, 2, num_tokens, 4), torch.ones(1, 2, num_tokens, 4))
        for _ in range(num_layers)
    ]


def test_kv_store_accounting_and_eviction():
    store = KVStore()
    token_bytes = 2 * 2 * 2 * 4 * 4  # layers * (k, v) * heads * head_dim * float32
    assert store.park("a", list(range(3)), kv(3)) == 3 * token_bytes
    store.park("b", list(range(5)), kv(5))
    store.park("c", list(range(2)), kv(2))
    assert store.parked_bytes == 10 * token_bytes
    store.park("a", list(range(4)), kv(4))  # replaces, and becomes the newest
    assert store.request_ids() == ["b", "c", "a"] and store.parked_bytes == 11 * token_bytes
    assert store.evict_for(1, protect={"b"}).dropped == ["c"]  # no host tier: dropped
    assert store.evict_for(6 * token_bytes).dropped == ["b", "a"]
    assert store.parked_bytes == 0 and len(store) == 0
    assert not store.evict_for(1)


def test_kv_store_take_and_drop():
    store = KVStore()
    store.park("a", [1, 2], kv(2))
    entry = store.take("a")
    assert entry is not None and entry.token_ids == (1, 2) and entry.num_tokens == 2
    assert store.take("a") is None and not store.drop("a") and store.parked_bytes == 0
