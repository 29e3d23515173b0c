"""Every way a request's KV can travel between slices, at the executor level with real handoff
threads: kept, handed off to another executor and back, offloaded to the host tier and restored,
lost (host full, or a failed handoff) and recomputed. Greedy tokens are identical on each path."""

from __future__ import annotations

import contextlib
import queue

import msgspec
import pytest
import torch
from worker.helpers import BIG_BUDGET, make_item, make_prompts, make_run, solo_greedy

from engine import protocol as p
from engine.worker import kv_wire as w
from engine.worker.executor import Executor
from engine.worker.handoff import HandoffThread
from engine.worker.kv_reuse import KVArrived, KVFetchFailed
from engine.worker.kv_store import KVStore

NUM_TOKENS, SLICE = 12, 4


class Node:
    """An executor with a handoff thread serving its store, as in a worker process."""

    def __init__(self, ctx, runner, budget: int = BIG_BUDGET, host_budget: int = 0) -> None:
        self.store = KVStore(host_budget_bytes=host_budget)
        self.executor = Executor(runner, budget, store=self.store)
        info, layout = runner.info, runner.layout
        shape = w.KVShape(info.num_layers, info.num_kv_heads, info.head_dim, layout.dtype, budget)
        self.arrivals: queue.Queue = queue.Queue()
        self.thread = HandoffThread(
            ctx, lambda: self.store, shape, self.arrivals.put, base_timeout_s=0.3
        )
        self.thread.start()
        self.offloaded: list[str] = []
        self.evicted: list[str] = []

    def run_slice(self, batch_id: int, items: list[p.BatchItem]) -> tuple[dict, p.BatchDone]:
        """Submit one sequential batch, start its handoffs, feed arrivals, drain."""
        run = make_run(batch_id, items)
        self.executor.submit(run)
        self.thread.fetch_for(run)
        tokens: dict[str, list[int]] = {}
        done = None
        while self.executor.has_work():
            wait_s = self.executor.wait_s()
            if wait_s:
                self.executor.receive_kv(self.arrivals.get(timeout=10))
                continue
            result = self.executor.step()
            for rid, toks in result.generated.tokens if result.generated else ():
                tokens.setdefault(rid, []).extend(toks)
            self.offloaded += result.offloaded
            self.evicted += result.evicted
            done = next((d for d in result.done if d.batch_id == batch_id), done)
        assert done is not None
        return tokens, done

    def close(self) -> None:
        self.thread.stop()
        self.thread.join(5)


@contextlib.contextmanager
def nodes(ctx, runner, *kwargs_list):
    made = [Node(ctx, runner, **kw) for kw in kwargs_list]
    try:
        yield made
    finally:
        for node in made:
            node.close()


def serve(prompts: dict[str, list[int]], route) -> tuple[dict[str, list[int]], list[p.BatchDone]]:
    """Serve every prompt NUM_TOKENS tokens in slices; ``route(slice_index, request_id)`` gives
    (node, kv_source) for its next slice. One batch per node per slice."""
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    dones = []
    for index in range(-(-NUM_TOKENS // SLICE)):
        by_node: dict[Node, list[p.BatchItem]] = {}
        for rid, got in out.items():
            node, source = route(index, rid)
            item = make_item(
                rid, prompts[rid] + got, max_steps=SLICE, max_new_tokens=NUM_TOKENS - len(got),
                num_generated=len(got), keep_kv=True,
            )  # fmt: skip
            by_node.setdefault(node, []).append(msgspec.structs.replace(item, kv_source=source))
        for n, (node, items) in enumerate(by_node.items()):
            tokens, done = node.run_slice(10 * index + n + 1, items)
            dones.append(done)
            for rid, toks in tokens.items():
                out[rid] += toks
    return out, dones


@pytest.fixture
def prompts() -> dict[str, list[int]]:
    return dict(zip(["a", "b", "c", "d"], make_prompts(21, [5, 17, 40, 9]), strict=True))


@pytest.fixture
def reference(runner, prompts) -> dict[str, list[int]]:
    return {rid: solo_greedy(runner, t, NUM_TOKENS) for rid, t in prompts.items()}


def test_handoffs_there_and_back_give_identical_tokens(ctx, runner, prompts, reference) -> None:
    with nodes(ctx, runner, {}, {}) as (a, b):
        flip = {0: (a, ""), 1: (b, a.thread.peer_addr), 2: (a, b.thread.peer_addr)}
        out, dones = serve(prompts, lambda index, rid: flip[index])
    assert out == reference
    moved = dones[1:]
    assert sum(d.recomputed_tokens for d in dones) == 0
    assert [d.handoff_tokens for d in moved] == [d.reused_kv_tokens for d in moved]
    assert all(d.handoff_tokens > 0 and d.handoff_bytes > 0 for d in moved)
    assert moved[0].handoff_bytes == moved[0].handoff_tokens * runner.info.kv_bytes_per_token
    assert all(len(d.transfer_samples) == 4 for d in moved)
    assert len(a.store) == len(b.store) == 0  # the last slice ended every request


def test_a_failed_handoff_recomputes_and_still_gives_identical_tokens(
    ctx, runner, prompts, reference
) -> None:
    with nodes(ctx, runner, {}, {}) as (a, b):
        gone = "tcp://127.0.0.1:1"  # nothing listens there: every fetch runs into its timeout
        route = {0: (a, ""), 1: (b, gone), 2: (b, "")}
        out, dones = serve(prompts, lambda index, rid: route[index])
    assert out == reference
    assert dones[1].recomputed_tokens == 4 * (SLICE - 1) and dones[1].handoff_tokens == 0
    assert dones[2].reused_kv_tokens > 0 and dones[2].recomputed_tokens == 0


@pytest.mark.parametrize("host_budget", [1 << 20, 0])
def test_offload_and_restore_or_drop_when_memory_binds(
    ctx, runner, prompts, reference, host_budget
) -> None:
    """Two groups alternate on one node whose budget holds one group running, not also the
    other parked: parked KV goes to the host tier (or, with no room there, is dropped)."""
    kvpt = runner.info.kv_bytes_per_token
    groups = {rid: i % 2 for i, rid in enumerate(prompts)}
    budget = 110 * kvpt  # group 0 runs in 104 tokens at most; group 1 parks up to 40
    with nodes(ctx, runner, {"budget": budget, "host_budget": host_budget}) as (node,):
        out, dones = serve_alternating(prompts, node, groups)
        assert node.store.host_bytes == sum(
            len(e.token_ids) * kvpt for e in map(node.store.take, node.store.request_ids("host"))
        )
    assert out == reference
    if host_budget:
        assert node.offloaded and not node.evicted
        assert sum(d.restored_tokens for d in dones) > 0
        assert all(d.recomputed_tokens == 0 for d in dones)
    else:
        assert node.evicted and not node.offloaded
        assert sum(d.recomputed_tokens for d in dones) > 0


def serve_alternating(prompts, node: Node, groups: dict[str, int]):
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    dones = []
    for index in range(2 * -(-NUM_TOKENS // SLICE)):
        items = [
            make_item(
                rid, prompts[rid] + got, max_steps=SLICE, max_new_tokens=NUM_TOKENS - len(got),
                num_generated=len(got), keep_kv=True,
            )
            for rid, got in out.items()
            if groups[rid] == index % 2
        ]  # fmt: skip
        tokens, done = node.run_slice(index + 1, items)
        dones.append(done)
        for rid, toks in tokens.items():
            out[rid] += toks
    return out, dones


def test_an_unawaited_or_late_arrival_is_dropped(runner) -> None:
    executor = Executor(runner, BIG_BUDGET)
    lay = runner.layout
    empty = torch.zeros((1, lay.num_kv_heads, 0, lay.head_dim), dtype=lay.dtype)
    layers = [(empty, empty) for _ in range(lay.num_layers)]
    executor.receive_kv(KVArrived("x", (), layers, 0, 0.1, "peer"))
    executor.receive_kv(KVFetchFailed("y", "whatever"))
    assert len(executor.kv_store) == 0 and executor.wait_s() is None


def test_an_arrival_lands_in_the_pool_evicting_parked_kv_no_waiting_dispatch_needs(
    ctx, runner, prompts, reference
) -> None:
    """Handed-off KV goes into blocks of the pool when it arrives, not beside it: what the
    worker holds stays within its budget. Parked KV makes way, oldest first, except that of a
    dispatch waiting here ("b" is older than "d", but queued)."""
    block = 16 * runner.info.kv_bytes_per_token
    budget = 5 * block  # "b" (20 tokens) and "d" (12) park in 3 blocks; "c" (43) needs 3

    def item(rid: str, got: list[int], source: str = "") -> p.BatchItem:
        return msgspec.structs.replace(
            make_item(
                rid, prompts[rid] + got, max_steps=SLICE, max_new_tokens=NUM_TOKENS - len(got),
                num_generated=len(got), keep_kv=True,
            ),
            kv_source=source,
        )  # fmt: skip

    with nodes(ctx, runner, {}, {"budget": budget}) as (a, b):
        first = a.run_slice(1, [item("c", [])])[0]
        first |= b.run_slice(2, [item("b", [])])[0]
        first |= b.run_slice(3, [item("d", [])])[0]
        assert b.store.request_ids() == ["b", "d"] and b.executor.pool.num_free == 2
        run_c = make_run(4, [item("c", first["c"], a.thread.peer_addr)])
        b.executor.submit(run_c)
        b.thread.fetch_for(run_c)
        b.executor.submit(make_run(5, [item("b", first["b"])]))
        b.executor.receive_kv(b.arrivals.get(timeout=10))
        assert b.store.staged_bytes == 0 and b.store.tier_of("c") == "device"
        assert b.store.request_ids() == ["b", "c"]  # "d" made way, "b" is waited for
        assert b.executor.kv_used_bytes <= budget
        tokens: dict[str, list[int]] = {}
        while b.executor.has_work():
            result = b.executor.step()
            for rid, toks in result.generated.tokens if result.generated else ():
                tokens.setdefault(rid, []).extend(toks)
            b.evicted += result.evicted
            assert b.executor.kv_used_bytes <= budget
    assert b.evicted == ["d"]
    for rid in ("c", "b"):
        assert first[rid] + tokens[rid] == reference[rid][: 2 * SLICE]
