"""The KV move model and SCLS auto mode: per request, the cheapest of keep, restore, handoff and
recompute; batches split over idle workers; work migrates from a slow or busy worker."""

from __future__ import annotations

import numpy as np
import pytest

from engine.cost_model import CostModel, MemoryModel, TimeModel
from engine.kv_cost import KVCostError, KVMoveModel, choose_path
from engine.scheduler.base import RunningRequest, WaitingRequest, WorkerView
from engine.scheduler.batcher import Rows, partition, span_of, split_to_fill
from engine.scheduler.scls import SCLSPolicy

KVB = 1000  # bytes per token
NOW = 100.0


def test_move_model_predicts_and_follows_measurements() -> None:
    kv = KVMoveModel(copy_bytes_per_s=2e9, transfer_bytes_per_s=1e9, transfer_latency_s=0.001)
    assert kv.restore_s(2_000_000) == pytest.approx(0.001)
    assert kv.handoff_s(1_000_000) == pytest.approx(0.002)
    for _ in range(40):  # the link is really 4x slower: followed within a few dozen transfers
        kv.observe(transfer_samples=[(4_000_000, 0.001 + 0.016)], copy_samples=[(1e6, 1e-3)])
    assert kv.transfer_bytes_per_s == pytest.approx(2.5e8, rel=0.01)
    assert kv.copy_bytes_per_s == pytest.approx(1e9, rel=0.01)
    kv.observe(transfer_samples=[(100, 5.0), (1e6, 0.0), (float("nan"), 1.0)])  # all ignored
    assert kv.transfer_bytes_per_s == pytest.approx(2.5e8, rel=0.01)


def test_move_model_rejects_unusable_figures_and_defaults_unmeasured_ones() -> None:
    with pytest.raises(KVCostError, match="bandwidths > 0"):
        KVMoveModel(copy_bytes_per_s=0.0)
    with pytest.raises(KVCostError, match="latency >= 0"):
        KVMoveModel(transfer_latency_s=float("nan"))
    assert KVMoveModel.measured(0.0, 0.0, 0.0) == KVMoveModel()


@pytest.mark.parametrize(
    ("args", "path"),
    [
        ((True, True, False, 0.0, 1.0), "keep"),
        ((True, True, True, 0.1, 1.0), "restore"),
        ((False, True, False, 0.1, 1.0), "handoff"),
        ((False, True, False, 2.0, 1.0), "recompute"),
        ((True, True, True, 2.0, 1.0), "recompute"),
        ((False, False, False, 0.0, 1.0), "recompute"),
    ],
)
def test_choose_path_takes_the_cheapest(args, path) -> None:
    assert choose_path(*args) == path


def test_split_to_fill_halves_until_every_worker_has_a_batch() -> None:
    time = TimeModel.default()
    mem = MemoryModel(KVB, 10**9)
    lens = np.full(20, 20, dtype=np.int64)
    rows = Rows(lens, np.full(20, 8, dtype=np.int64), np.ones(20, dtype=bool), np.full(20, 0.01))
    spans = partition(rows, time, [mem], max_rows=256)
    assert len(spans) == 1  # the DP alone puts everything in one batch
    assert spans[0].predicted_s == pytest.approx(span_of(rows, 0, 20, time).predicted_s)
    halves = split_to_fill(rows, spans, 3, time)
    assert [(s.start, s.end) for s in halves] == [(0, 5), (5, 10), (10, 20)]
    assert max(s.predicted_s for s in halves) < spans[0].predicted_s
    one = Rows(lens[:1], np.ones(1, dtype=np.int64), np.ones(1, dtype=bool))
    assert len(split_to_fill(one, partition(one, time, [mem], 8), 4, time)) == 1


def worker(worker_id: str, busy: bool = False, slow: float = 1.0, **kv) -> WorkerView:
    base = TimeModel.default()
    time = TimeModel([c * slow for c in base.prefill], [c * slow for c in base.decode])
    running = (RunningRequest("x", 10, 5, 15),) if busy else ()
    cost = CostModel(time, MemoryModel(KVB, 200_000_000), KVMoveModel(**kv))
    return WorkerView(worker_id, cost, NOW + 1000.0 if busy else NOW - 1, 0, running, 0)


def parked(n: int, holder: str | None, context_len: int = 500, on_host: bool = False):
    return [
        WaitingRequest(f"{holder}-{i}", context_len, context_len - 40, 40, 200, NOW - 1.0, holder,
                       on_host)
        for i in range(n)
    ]  # fmt: skip


def auto() -> SCLSPolicy:
    return SCLSPolicy(slice_len=64, max_batch_size=64, aging_s=60.0, kv_mode="auto")


def test_a_request_parked_on_a_busy_worker_is_handed_off_when_that_is_cheaper() -> None:
    waiting = parked(4, "a")
    [d] = auto().schedule(waiting, [worker("a", busy=True), worker("b")], NOW)
    assert (
        d.worker_id == "b" and set(d.handoff_ids) == set(d.request_ids) and len(d.request_ids) == 4
    )
    # a link so slow that prefilling is cheaper: recompute instead
    [d] = auto().schedule(
        waiting, [worker("a", busy=True), worker("b", transfer_bytes_per_s=1e3)], NOW
    )
    assert d.worker_id == "b" and d.handoff_ids == ()
    keep = SCLSPolicy(slice_len=64, max_batch_size=64, aging_s=60.0, kv_mode="keep")
    assert keep.schedule(waiting, [worker("a", busy=True), worker("b")], NOW) == []


def test_work_migrates_from_the_holder_when_two_workers_are_idle() -> None:
    waiting = parked(16, "a")
    plan = auto().schedule(waiting, [worker("a"), worker("b")], NOW)
    assert sorted(d.worker_id for d in plan) == ["a", "b"]
    by_worker = {d.worker_id: d for d in plan}
    assert by_worker["a"].handoff_ids == ()  # kept where it is
    assert set(by_worker["b"].handoff_ids) == set(by_worker["b"].request_ids)
    assert len(by_worker["a"].request_ids) + len(by_worker["b"].request_ids) == 16


def test_the_slow_worker_keeps_the_smaller_batch() -> None:
    waiting = parked(12, "a", context_len=100) + parked(12, "b", context_len=300)
    plan = auto().schedule(waiting, [worker("a", slow=3.0), worker("b")], NOW)
    sizes = {d.worker_id: d.padded_len * len(d.request_ids) for d in plan}
    assert sizes["a"] < sizes["b"]  # the slow worker got the lighter batch


def test_restores_and_handoffs_are_priced_into_the_prediction() -> None:
    policy = auto()
    local = policy.schedule(parked(4, "a"), [worker("a")], NOW)[0]
    on_host = policy.schedule(
        parked(4, "a", on_host=True), [worker("a", copy_bytes_per_s=1e6)], NOW
    )[0]
    nbytes = 4 * 499 * KVB
    assert on_host.predicted_s == pytest.approx(local.predicted_s + nbytes / 1e6)
    moved = policy.schedule(
        parked(4, "a"), [worker("a", busy=True), worker("b", transfer_latency_s=0.5)], NOW
    )[0]
    assert moved.predicted_s == pytest.approx(local.predicted_s + 4 * 0.5 + nbytes / 1e9)


def test_a_slow_ready_worker_takes_its_share_not_everything() -> None:
    """The fast worker is busy for a second more; the slow one is idle. The slow one gets part
    of the work now, the rest waits for the fast one (plain SCLS gave the slow one all)."""
    waiting = parked(16, "slow")
    workers = [worker("slow", slow=3.0), worker("fast", busy=True)]
    workers[1] = WorkerView("fast", workers[1].cost, NOW + 1.0, 0, workers[1].running, 0)
    [d] = auto().schedule(waiting, workers, NOW)
    assert d.worker_id == "slow" and 0 < len(d.request_ids) < 16
    oldest = WaitingRequest("old", 500, 460, 40, 200, NOW - 100.0, "slow")
    plan = auto().schedule([*waiting, oldest], workers, NOW)
    assert any("old" in d.request_ids for d in plan)  # the oldest request never waits
