"""Metric computations against hand-computed examples."""

from __future__ import annotations

import pytest

from engine.bench import metrics
from engine.bench.records import RequestRecord, RunResult, TimelineSample, WorkerSample


def _request(index, prompt_len, output_len, submitted_s, chunks, reason="length", slices=1):
    rec = RequestRecord(index, prompt_len, output_len, scheduled_s=submitted_s)
    rec.submitted_s = submitted_s
    for at_s, num in chunks:
        rec.add_chunk(at_s, num)
    rec.finished_s = chunks[-1][0] if chunks else None
    rec.finish_reason, rec.num_slices = reason, slices
    return rec


@pytest.fixture
def records():
    r0 = _request(0, 10, 4, 0.0, [(1.0, 1), (1.5, 2), (2.5, 1)], slices=3)
    r1 = _request(1, 20, 2, 1.0, [(2.0, 1), (4.0, 1)])
    r2 = _request(2, 30, 8, 1.0, [(3.0, 1)], reason="error")
    return [r0, r1, r2]


def test_per_request_latencies(records):
    r0, r1, _ = records
    assert metrics.ttft_s(r0) == 1.0 and metrics.e2el_s(r0) == 2.5
    assert metrics.tpot_s(r0) == pytest.approx(0.5)  # (2.5 - 1.0) / (4 - 1)
    assert metrics.itls_s(r0) == [0.5, 1.0]  # one gap per delta, whatever it carried
    assert metrics.tpot_s(r1) == pytest.approx(2.0)
    one_token = _request(3, 5, 1, 0.0, [(0.5, 1)])
    assert metrics.tpot_s(one_token) is None and metrics.itls_s(one_token) == []


def test_request_metrics(records):
    m = metrics.request_metrics(records, duration_s=4.0, goodput_ms={})
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["output_throughput"] == pytest.approx(1.5)
    assert m["total_token_throughput"] == pytest.approx(9.0)
    assert m["mean_ttft_ms"] == pytest.approx(1000.0) and m["std_ttft_ms"] == 0.0
    assert m["mean_tpot_ms"] == pytest.approx(1250.0)
    assert m["median_tpot_ms"] == pytest.approx(1250.0)
    assert m["p99_tpot_ms"] == pytest.approx(500.0 + 0.99 * 1500.0)  # linear interpolation
    assert m["mean_itl_ms"] == pytest.approx(3500.0 / 3)
    assert m["p50_itl_ms"] == pytest.approx(1000.0)
    assert m["mean_e2el_ms"] == pytest.approx(2750.0)
    assert m["p90_e2el_ms"] == pytest.approx(2950.0)
    assert m["max_stall_ms"] == pytest.approx(2000.0)
    assert m["mean_max_stall_ms"] == pytest.approx(1500.0)
    assert m["request_goodput"] is None
    assert m["num_length_mismatches"] == 0


def test_goodput(records):
    targets = metrics.parse_goodput(["ttft:1500", "tpot:1000"])
    assert targets == {"ttft": 1500.0, "tpot": 1000.0}
    m = metrics.request_metrics(records, 4.0, targets)
    assert m["request_goodput"] == pytest.approx(0.25)  # only r0 meets both; r2 failed
    e2e = metrics.request_metrics(records, 4.0, metrics.parse_goodput(["e2e:2600"]))
    assert e2e["request_goodput"] == pytest.approx(0.25)
    for bad in ("foo:1", "ttft:abc", "ttft:-1", "ttft"):
        with pytest.raises(metrics.MetricsError, match="KEY:MILLISECONDS"):
            metrics.parse_goodput([bad])


def test_empty_distribution_is_none():
    out = metrics.distribution([], "ttft")
    assert out["mean_ttft_ms"] is None and out["p99_ttft_ms"] is None


def test_imbalance():
    assert metrics.imbalance([3.0, 1.0]) == pytest.approx((0.5, 0.5))
    assert metrics.imbalance([2.0, 2.0]) == (0.0, 0.0)
    assert metrics.imbalance([0.0, 0.0]) == (None, None)
    assert metrics.imbalance([]) == (None, None)


def _sample(at_s, busy0, busy1, num_preempted=0):
    def worker(worker_id, busy):
        return WorkerSample(worker_id, busy, 0.0, 0, 1, 10, 0, 20, 190)

    workers = [worker("w0", busy0), worker("w1", busy1)]
    return TimelineSample(at_s, 0, 0, workers, num_preempted)


def _batch(batch_id, pad, recomputed, early, measured, predicted):
    return {
        "batch_id": batch_id, "pad_tokens": pad, "invalid_tokens": 0,
        "recomputed_tokens": recomputed, "reused_kv_tokens": 1, "prefill_tokens": 7,
        "early_return": early, "measured_peak_bytes": measured, "predicted_peak_bytes": predicted,
    }  # fmt: skip


def test_engine_metrics(records):
    run = RunResult(
        name="scls", kind="policy", repeat=0, config={}, requests=records, duration_s=4.0,
        wall_s=9.0,
        timeline=[_sample(0.0, True, True), _sample(1.0, True, False, 2), _sample(2.0, False, False, 2)],
        batches=[_batch(1, 5, 0, True, 100, 150), _batch(2, 3, 4, False, 200, 180)],
        events=[{"at_s": 1.0, "level": "error", "message": "worker w1 failed batch 3: boom"}],
        workers_start={"w0": {"busy_s": 1.0, "generated_tokens": 0.0}},
        workers_end={
            "w0": {"busy_s": 4.0, "generated_tokens": 10.0, "prefix_hit_tokens": 32.0, "prefix_cached_tokens": 64.0},
            "w1": {"busy_s": 1.0, "generated_tokens": 10.0},
        },
    )  # fmt: skip
    m = metrics.engine_metrics(run, slice_len=2)
    assert m["per_worker"]["w0"] == {
        "busy_s": 2.0, "dispatch_s": 3.0, "generated_tokens": 10.0,
        "prefix_hit_tokens": 32.0, "prefix_cached_tokens": 64.0,
    }  # fmt: skip
    assert m["per_worker"]["w1"]["busy_s"] == 1.0
    assert m["load_imbalance"] == pytest.approx(2.0 / 1.5 - 1.0)
    assert m["busy_cv"] == pytest.approx(0.5 / 1.5)
    assert m["token_imbalance"] == 0.0
    assert (m["pad_tokens"], m["recomputed_tokens"], m["reused_kv_tokens"]) == (8, 4, 2)
    assert m["early_return_ratio"] == 0.5
    assert m["mean_slices_per_request"] == 2.0  # r0: 3 slices, r1: 1 (r2 failed)
    # the broker's counter says 2 (the slice counts alone would have suggested 1)
    assert (m["preemptions"], m["worker_failures"], m["error_requests"]) == (2, 1, 1)
    assert m["oom_count"] == 4
    # without any snapshot: inferred, r0 asked for 4 tokens in slices of 2 and got 3 dispatches
    run.timeline = []
    assert metrics.engine_metrics(run, slice_len=2)["preemptions"] == 1
    assert (m["peak_measured_bytes"], m["peak_predicted_bytes"]) == (200, 180)
    assert m["kv_budget_bytes"] == 190 and m["peak_kv_used_bytes"] == 10
    assert m["num_batches_over_budget"] == 1 and m["num_batches_over_prediction"] == 1


def test_unknown_slices_and_excess_tokens(records):
    records[0].num_slices = 0  # left early (hidden length): no Finished told its slices
    run = RunResult("ils", "policy", 0, {}, records, 4.0, 5.0)
    run.batches = [_batch(1, 0, 0, False, 1, 1) | {"generated_tokens": 10}]
    m = metrics.engine_metrics(run, slice_len=None)
    assert m["mean_slices_per_request"] == 1.0 and m["preemptions"] == 0
    assert m["excess_tokens"] == 10 - (4 + 2 + 1)
    run.num_batches_missed = 1
    assert metrics.engine_metrics(run, slice_len=None)["excess_tokens"] is None


def test_expected_dispatches():
    assert metrics.expected_dispatches("scls", 64, 32) == 2
    assert metrics.expected_dispatches("scls:recompute", 65, 32) == 3
    assert metrics.expected_dispatches("scls", 64, 32, hidden_length=True) == 3
    assert metrics.expected_dispatches("scls", 65, 32, hidden_length=True) == 3
    assert metrics.expected_dispatches("ils", 500, 32) == 1
    assert metrics.expected_dispatches("hf_generate", 500, 32) == 1


def test_aggregate_and_ratios():
    agg = metrics.aggregate([{"x": 1, "y": "a", "z": None}, {"x": 3, "y": "b", "z": 2}])
    assert agg == {"x": 2.0, "y": "a", "z": None, "num_repeats": 2}
    assert metrics.aggregate([{"x": 1}]) == {"x": 1}
    summaries = {"sls": {"request_throughput": 1.0}, "scls": {"request_throughput": 4.0}}
    out = metrics.ratios(summaries, "sls", ["request_throughput", "missing"])
    assert out["scls"] == {"request_throughput": 4.0, "missing": None}
    with pytest.raises(metrics.MetricsError, match="did not run"):
        metrics.ratios(summaries, "ils", ["request_throughput"])
