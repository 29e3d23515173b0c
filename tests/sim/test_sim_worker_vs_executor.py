"""The simulated worker against the real executor on the tiny model: the same dispatch sequence
gives, step by step, the same rows sampled, the same releases (reason, tokens, KV kept, prompt
tokens found in the prefix cache), the same KV moved out, as many prefix-cache blocks named and
forgotten, and the same batch counters."""

from __future__ import annotations

import random

import msgspec
import pytest

torch = pytest.importorskip("torch")

from worker.helpers import make_item, make_run  # noqa: E402

from engine import protocol as p  # noqa: E402
from engine.cost_model import TimeModel  # noqa: E402
from engine.sim.devices import DeviceModel, ProfileTimer  # noqa: E402
from engine.sim.worker import SimWorker  # noqa: E402
from engine.worker.executor import Executor  # noqa: E402
from engine.worker.model_loader import load_model  # noqa: E402
from engine.worker.runner import Runner  # noqa: E402

torch.set_num_threads(1)


def item(request_id: str, token_ids: list[int], max_steps: int, max_new: int, keep: bool = True):
    return make_item(
        request_id, token_ids, max_steps=max_steps, max_new_tokens=max_new, keep_kv=keep
    )


def run(batch_id: int, items: list[p.BatchItem], join: bool) -> p.RunBatch:
    return make_run(batch_id, items, join=join)


def copy(msg):
    """Each side gets its own message (a renewal changes the items it holds)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=type(msg))


class Pair:
    """One real executor and one simulated worker with the same pool, fed the same commands."""

    def __init__(
        self, runner: Runner, budget_bytes: int, prefix_cache: bool = False, interval: int = 1
    ) -> None:
        self.real = Executor(
            runner, budget_bytes, prefix_cache=prefix_cache, stream_interval=interval
        )
        pool = self.real.pool
        time = TimeModel.default()
        device = DeviceModel(
            name="tiny", model="tiny", timer=ProfileTimer(time), time_model=time,
            kv_bytes_per_token=pool.block_bytes // pool.block_tokens, kv_budget_bytes=budget_bytes,
            max_context_len=runner.info.max_context_len, copy_bytes_per_s=1e9,
            transfer_bytes_per_s=1e9, transfer_latency_s=0.0, host_kv_budget_bytes=0,
        )  # fmt: skip
        self.sim = SimWorker("sim", device, prefix_cache=prefix_cache, stream_interval=interval)
        assert self.sim.pool.num_blocks == pool.num_blocks
        self.now = 0.0
        self.tokens: dict[str, list[int]] = {}  # the real tokens, to continue requests
        self.released: dict[str, tuple] = {}  # the last release of each request (real side)

    def command(self, msg) -> None:
        real = copy(msg)
        if isinstance(msg, p.RunBatch):
            self.real.submit(real)
        elif isinstance(msg, p.Renew):
            self.real.renew(real.renewals)
        elif isinstance(msg, p.Abort):
            self.real.abort(real.request_ids)
        self.sim.command(copy(msg), self.now)

    def step(self) -> tuple[dict, dict]:
        """One step on both sides; what each sent, normalised."""
        result = self.real.step()
        real_msgs = []
        if result.generated is not None:
            real_msgs.append(result.generated)
            for rid, toks in result.generated.tokens:
                self.tokens.setdefault(rid, []).extend(toks)
        if result.blocks is not None:
            real_msgs.append(result.blocks)
        real_msgs += result.released + result.done
        if result.offloaded:
            real_msgs.append(p.KVEvicted(request_ids=result.offloaded, offloaded=True))
        if result.evicted:
            real_msgs.append(p.KVEvicted(request_ids=result.evicted, offloaded=False))
        end = self.sim.start_step(self.now)
        if end is None:
            sim_msgs = self.sim.flush(self.now)
        else:
            self.now = end
            sim_msgs = self.sim.end_step(self.now)
        real, sim = normalise(real_msgs), normalise(sim_msgs)
        self.released.update((r[0], r) for r in real["released"])
        return real, sim

    def drain(self, max_steps: int = 200) -> int:
        for num in range(max_steps):
            if not self.real.has_work():
                assert self.sim.next_wake_at(self.now) is None
                return num
            real, sim = self.step()
            assert real == sim, f"step {num}"
        raise AssertionError("still busy")


def normalise(msgs) -> dict:
    out: dict = {"sampled": [], "released": [], "evicted": [], "done": [], "blocks": []}
    for msg in msgs:
        if isinstance(msg, p.Generated):
            out["sampled"] += [rid for rid, toks in msg.tokens for _ in toks]
        elif isinstance(msg, p.Released):
            out["released"].append(
                (msg.request_id, msg.reason, msg.num_generated, msg.kv_kept, msg.cached_tokens)
            )
        elif isinstance(msg, p.BlockEvents):  # names differ: each side chains from its root
            out["blocks"].append((len(msg.stored), len(msg.removed)))
        elif isinstance(msg, p.KVEvicted):
            out["evicted"].append((sorted(msg.request_ids), msg.offloaded))
        elif isinstance(msg, p.BatchDone):
            out["done"].append((
                msg.batch_id, msg.steps, msg.prefill_tokens, msg.recomputed_tokens,
                msg.reused_kv_tokens, msg.generated_tokens, msg.prefix_query_tokens,
                msg.prefix_hit_tokens,
            ))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def runner(tiny_model_dir) -> Runner:
    return Runner(load_model(str(tiny_model_dir)))


def prompts(seed: int, lens: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lens]


@pytest.mark.parametrize("interval", [1, 3])
def test_joins_chunked_prefill_parking_renewal_and_abort(runner: Runner, interval: int) -> None:
    """(``interval``: both send their tokens every that many steps, --stream-interval.)"""
    pair = Pair(runner, 1 << 26, interval=interval)
    a, b, c, d = prompts(1, [40, 700, 130, 20])
    pair.command(run(1, [item("a", a, 6, 20), item("b", b, 4, 9)], join=True))
    real, sim = pair.step()  # b's 700 tokens are prefilled in chunks over several steps
    assert real == sim and real["sampled"] == ["a"]
    pair.command(run(2, [item("c", c, 5, 5, keep=False)], join=True))
    pair.command(p.Renew(renewals=[("a", 12)]))
    for _ in range(3):
        real, sim = pair.step()
        assert real == sim
    pair.command(p.Abort(request_ids=["c"]))
    pair.command(run(3, [item("d", d, 3, 3)], join=False))  # waits for the running set
    pair.drain()
    # a and b parked their KV; their next slices adopt it (no prefill)
    again = [item(r, toks + pair.tokens[r], 4, 4) for r, toks in (("a", a), ("b", b))]
    for it, rid in zip(again, ("a", "b"), strict=True):
        it.num_generated = len(pair.tokens[rid])
    pair.command(run(4, again, join=True))
    pair.drain()


def test_tight_memory_evicts_parked_kv_then_preempts(runner: Runner) -> None:
    block_bytes = Executor(runner, 1 << 20).pool.block_bytes
    pair = Pair(runner, 24 * block_bytes)  # 24 blocks of 16 tokens
    first = prompts(2, [60, 60])
    pair.command(run(1, [item(f"p{i}", t, 3, 50) for i, t in enumerate(first)], join=True))
    assert pair.drain() > 0  # both parked (budget ended), 8 blocks
    # reservations of 3 x (100 + 30 tokens) do not fit: one step's blocks each, growing, then
    # parked KV is evicted and the newest rows preempted
    big = prompts(3, [100, 100, 100])
    pair.command(run(2, [item(f"q{i}", t, 30, 30) for i, t in enumerate(big)], join=True))
    steps, released, evicted = 0, [], []
    while pair.real.has_work():
        real, sim = pair.step()
        assert real == sim, f"step {steps}"
        released += real["released"]
        evicted += real["evicted"]
        steps += 1
    assert evicted and {r[1] for r in released} >= {"preempted", "length"}


def test_prefix_cache_shares_adopts_and_parks_alike(runner: Runner) -> None:
    """Prompts sharing a prefix: a later one shares the cached blocks of an ended one; two that
    join together with a new shared prefix compute it once (the younger waits, then adopts);
    a parked request's next slice adopts its own KV; the same counts of blocks are named."""
    pair = Pair(runner, 1 << 26, prefix_cache=True)
    shared, tails = prompts(4, [100]), prompts(5, [30, 7, 50, 50, 20])
    pair.command(run(1, [item("a", shared[0] + tails[0], 4, 4, keep=False)], join=True))
    pair.drain()
    pair.command(run(2, [item("b", shared[0] + tails[1], 3, 3, keep=False)], join=True))
    real, sim = pair.step()
    assert real == sim and real["sampled"] == ["b"]  # 96 of its 106 tokens were cached
    pair.drain()
    (long,) = prompts(6, [600])  # chunked: both rows reach its blocks in the same steps
    pair.command(run(3, [item("c", long + tails[2], 5, 9), item("d", long + tails[3], 5, 5)], True))
    pair.drain()
    again = item("c", long + tails[2] + pair.tokens["c"], 4, 4)
    again.num_generated = len(pair.tokens["c"])
    pair.command(run(4, [again, item("e", long[:200] + tails[4], 2, 2)], join=True))
    pair.drain()
    cached = {rid: r[4] for rid, r in pair.released.items()}
    # b found a's 6 full blocks; d adopted the blocks c computed as they were written; e shares
    # the 12 full blocks of the first 200 tokens; c's next slice adopted its parked KV instead
    assert cached["b"] == 96 and cached["d"] > 0 and cached["e"] == 192
    assert pair.real.pool.num_cached > 0  # ended requests' named blocks stay reusable
