"""The results files: JSON document structure, Markdown tables, PNG plots (no engine)."""

from __future__ import annotations

import json

from engine.bench import plots, report
from engine.bench.records import RequestRecord, RunResult, TimelineSample, WorkerSample


def _run(name, kind, repeat, speed):
    requests = []
    for i in range(4):
        rec = RequestRecord(i, 10, 3, scheduled_s=0.0, submitted_s=0.0)
        for step in range(3):
            rec.add_chunk((i + step + 1) / speed, 1)
        rec.finished_s, rec.finish_reason, rec.num_slices = rec.chunk_times_s[-1], "length", 1
        requests.append(rec)
    run = RunResult(name, kind, repeat, {}, requests, duration_s=6 / speed, wall_s=10.0)
    if kind == "policy":
        run.timeline = [
            TimelineSample(t, 0, 1, [WorkerSample(w, True, t, 3, 1, 1000 * t, 0, 2000, 4096)
                                     for w in ("w0", "w1")])
            for t in (0.0, 1.0, 2.0)
        ]  # fmt: skip
        run.batches = [
            {"batch_id": 1, "pad_tokens": 2, "invalid_tokens": 0, "recomputed_tokens": 0,
             "reused_kv_tokens": 0, "prefill_tokens": 40, "early_return": True,
             "measured_peak_bytes": 2000, "predicted_peak_bytes": 2500}
        ]  # fmt: skip
        run.workers_end = {w: {"busy_s": 2.0, "generated_tokens": 6.0} for w in ("w0", "w1")}
    else:
        run.extra = {"metrics": {"pad_tokens": 5, "kv_budget_bytes": 8192, "cpu_s": 2.0}}
    return run


def _document():
    results = [_run("sls", "policy", 0, 1.0), _run("scls", "policy", 0, 4.0),
               _run("hf_generate", "peer", 0, 2.0), _run("sls", "policy", 1, 1.0)]  # fmt: skip
    return report.build_document(
        command="run.py bench --policies sls,scls --peers hf_generate",
        config={"num_workers": 2, "scheduler": {"slice_len": 2}},
        workload={"name": "synthetic:prompt=10,output=3", "description": {"num_requests": 4}},
        arrival={"kind": "offline"}, goodput_ms={"e2el": 2500.0}, baseline="sls",
        results=results, slice_len=2,
    )  # fmt: skip


def test_document_structure(tmp_path):
    doc = _document()
    assert list(doc["summary"]) == ["sls", "scls", "hf_generate"]
    assert len(doc["runs"]["sls"]) == 2 and doc["summary"]["sls"]["num_repeats"] == 2
    scls = doc["summary"]["scls"]
    for key in ("request_throughput", "output_throughput", "total_token_throughput",
                "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p90_e2el_ms",
                "request_goodput", "load_imbalance", "pad_tokens", "recomputed_tokens",
                "early_return_ratio", "oom_count", "peak_measured_bytes", "kv_budget_bytes"):  # fmt: skip
        assert key in scls, key
    assert scls["request_throughput"] == 4 * doc["summary"]["sls"]["request_throughput"]
    assert doc["ratios"]["scls"]["request_throughput"] == 4.0
    assert doc["summary"]["hf_generate"]["pad_tokens"] == 5  # the peer's own counter
    assert doc["summary"]["hf_generate"]["output_tokens_per_cpu_s"] == 6.0  # 12 tokens / 2 s
    assert scls["output_tokens_per_cpu_s"] is None  # no CPU time recorded
    first = doc["runs"]["scls"][0]
    assert first["requests"][0]["chunk_times_s"] == [0.25, 0.5, 0.75]
    assert first["summary"]["completed"] == 4
    path = tmp_path / "results.json"
    report.write_json(doc, path)
    assert json.loads(path.read_text())["summary"]["scls"]["completed"] == 4


def test_markdown_tables():
    text = report.markdown(_document())
    assert "| name | done | req/s |" in text
    assert "| scls | 4 |" in text
    assert "| scls | 4.00x |" in text  # request throughput against sls
    assert "## Engine" in text and "n/a" in text  # peers have no load imbalance


def test_plots(tmp_path):
    written = plots.write_plots(json.loads(json.dumps(_document())), tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["latency_cdf.png", "memory.png", "throughput.png", "worker_load.png"]
    assert all(p.stat().st_size > 1000 for p in written)
