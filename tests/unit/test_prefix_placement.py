"""Prefix-aware placement with a fake prefix index (``WaitingRequest.cached_tokens``): a request
goes where its prefix is cached, a hot prefix does not send every request to one worker, and ILS
places by the same rule."""

from __future__ import annotations

from engine.cost_model import CostModel, MemoryModel, TimeModel
from engine.scheduler.base import RunningRequest, WaitingRequest, WorkerView
from engine.scheduler.continuous import ContinuousSCLSPolicy
from engine.scheduler.ils import ILSPolicy
from engine.scheduler.prefix_affinity import PrefixBalance, balanced, most_cached


def worker(worker_id: str, budget: int = 1_000_000, running=()) -> WorkerView:
    cost = CostModel(TimeModel.default(), MemoryModel(1, budget, block_tokens=16))
    return WorkerView(worker_id, cost, 0.0, 0, tuple(running), 0)


def hot(n: int, cached_on: dict[str, int], context_len: int = 2000) -> list[WaitingRequest]:
    return [
        WaitingRequest(f"r{i}", context_len, context_len, 0, 64, 0.1 * i, cached_tokens=cached_on)
        for i in range(n)
    ]


def placed(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in plan:
        out[d.worker_id] = out.get(d.worker_id, 0) + len(d.request_ids)
    return out


def policies():
    return [ContinuousSCLSPolicy(slice_len=32, max_batch_size=64, aging_s=10.0), ILSPolicy()]


def test_a_request_goes_where_its_prefix_is_cached():
    for policy in policies():
        one = hot(1, {"b": 1984})
        assert placed(policy.schedule(one, [worker("a"), worker("b")], 1.0)) == {"b": 1}, policy


def test_a_near_tie_goes_to_the_worker_holding_more_of_the_prefix():
    """One more block cached on b (16 of 2,000 tokens) saves little time, and b runs one more
    row, but b then holds the conversation's whole history for its next turn."""
    busy = RunningRequest("other", 100, 50, 150, 20, 0.0)
    for policy in policies():
        one = hot(1, {"a": 1968, "b": 1984})
        workers = [worker("a"), worker("b", running=(busy,))]
        assert placed(policy.schedule(one, workers, 1.0)) == {"b": 1}, policy
        assert placed(policy.schedule(hot(1, {}), workers, 1.0)) == {"a": 1}, policy


def test_a_hot_prefix_does_not_send_every_request_to_one_worker():
    """20 requests whose 1,984-token prefix only b holds: b takes more, within the bound
    (least * 1.25 + 2 rows), and a takes the rest."""
    for policy in policies():
        got = placed(policy.schedule(hot(20, {"b": 1984}), [worker("a"), worker("b")], 1.0))
        assert sum(got.values()) == 20
        assert got["b"] > got["a"] > 0, (policy, got)
        assert got["b"] <= got["a"] * 1.25 + 3, (policy, got)


def test_without_a_hit_placement_is_unchanged():
    for policy in policies():
        got = placed(policy.schedule(hot(10, {}), [worker("a"), worker("b")], 1.0))
        assert got == {"a": 5, "b": 5}, policy


def test_balance_rule():
    bound = PrefixBalance(relative=0.25, absolute=1)
    loads = {"a": 2, "b": 4, "c": 3}
    assert balanced(list(loads), loads.get, bound) == ["a", "c"]  # at most 2 * 1.25 + 1 = 3.5
    cached = {"a": 0, "b": 100, "c": 50}
    assert most_cached(["a", "c", "b"], loads.get, cached.get, bound) == "c"
