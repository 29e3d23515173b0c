"""Simulated workers keep a prefix cache as real ones do (engine/sim/kv.py, engine/sim/worker.py;
block by block against the executor in test_sim_worker_vs_executor.py): prompts that repeat a
prefix (system prompts, earlier turns of a conversation) find its blocks, prompts of their own
find none, and the broker's prefix index learns each worker's blocks from its BlockEvents."""

from __future__ import annotations

from engine.bench.workloads import load_workload
from engine.config import SchedulerConfig
from engine.sim.cluster import SimItem, Simulation
from engine.sim.devices import device_model

SHARED = "synthetic:prompt=uniform:20:80,output=16,shared=400,groups=2"
CHAT = "synthetic:prompt=uniform:20:80,output=24,turns=uniform:3:6,conversations=4"
OWN = "synthetic:prompt=uniform:100:400,output=16"


def items(spec: str, n: int) -> tuple[list[SimItem], list[float]]:
    requests = load_workload(spec, n, seed=2).requests
    out = [SimItem(r.index, r.prompt_len, r.output_len, None, r.segments) for r in requests]
    return out, [0.25 * i for i in range(n)]  # one at a time: each ends before the next


def simulate(spec: str, n: int = 24, prefix_cache: bool = True, instances: int = 1):
    its, times = items(spec, n)
    dev = device_model("h100-80gb:llama-3-8b")
    sim = Simulation(SchedulerConfig(), [dev] * instances, prefix_cache=prefix_cache)
    out = sim.run(its, times)
    assert all(r.success for r in out.records)
    return sim, out


def hit_tokens(out) -> int:
    return sum(r.cached_tokens for r in out.records)


def test_a_shared_system_prompt_is_found_in_the_cache() -> None:
    sim, out = simulate(SHARED)
    assert hit_tokens(out) > 0
    # only whole blocks of the shared part: never a request's own message
    assert all(r.cached_tokens % 16 == 0 and r.cached_tokens <= 400 for r in out.records)
    assert sum(r.cached_tokens == 400 - 400 % 16 for r in out.records) >= 20  # 2 groups: misses
    assert sim.core.prefix.num_blocks("sim-0") > 0  # the broker's index heard of its blocks
    assert out.workers_end["sim-0"]["prefix_hit_tokens"] == hit_tokens(out)


def test_later_turns_of_a_conversation_find_the_earlier_ones() -> None:
    _, out = simulate(CHAT)
    later = [r for r in out.records if r.cached_tokens > 0]
    assert len(later) >= 12 and hit_tokens(out) > 0.3 * sum(r.prompt_len for r in out.records)


def test_prompts_of_their_own_share_nothing() -> None:
    _, out = simulate(OWN)
    assert hit_tokens(out) == 0


def test_without_the_cache_nothing_is_found_and_more_is_prefilled() -> None:
    _, with_cache = simulate(SHARED)
    sim, without = simulate(SHARED, prefix_cache=False)
    assert hit_tokens(without) == 0 and sim.core.prefix.num_blocks("sim-0") == 0
    prefilled = [sum(b["prefill_tokens"] for b in o.batches) for o in (with_cache, without)]
    assert prefilled[0] + hit_tokens(with_cache) == prefilled[1]


def test_placement_follows_the_cached_prefix() -> None:
    """Two instances: turns of a conversation go where its history is cached, so hits beat
    what a placement by load alone finds."""
    its, times = items(CHAT, 40)
    dev = device_model("h100-80gb:llama-3-8b")
    hits = {}
    for placement in (True, False):
        sim = Simulation(SchedulerConfig(prefix_placement=placement), [dev, dev])
        hits[placement] = hit_tokens(sim.run(its, times))
    assert hits[True] > hits[False]
