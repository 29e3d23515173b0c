"""A short end-to-end benchmark on the tiny model: a real engine (one policy), a peer, the files."""

from __future__ import annotations

import json

import pytest

from engine.bench.cli import bench_main


@pytest.mark.timeout(90)  # the engine start-up on a shared 2-core machine dominates
def test_bench_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    code = bench_main([
        "--model", str(tiny_model_dir), "--no-profile", "--threads", "1", "--workers", "2",
        "--kv-budget", "4MiB", "--policies", "scls", "--peers", "hf_generate",
        "--workload", "synthetic:prompt=uniform:8:24,output=uniform:4:24", "--num-requests", "6",
        "--slice-len", "8", "--max-gen-len", "64", "--arrival", "poisson:50", "--seed", "1",
        "--goodput", "e2e:60000", "--out", str(out), "--max-duration", "60",
    ])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["partial"] is False
    assert set(doc) >= {"config", "workload", "arrival", "summary", "ratios", "runs", "command"}
    assert doc["workload"]["description"]["num_requests"] == 6
    assert doc["config"]["num_workers"] == 2 and doc["baseline"] == "scls"
    assert list(doc["summary"]) == ["scls", "hf_generate"]
    for name, summary in doc["summary"].items():
        assert summary["completed"] == 6, name
        assert summary["request_throughput"] > 0 and summary["output_throughput"] > 0
        assert summary["request_goodput"] == summary["request_throughput"]
        assert summary["num_length_mismatches"] == 0
        for rec in doc["runs"][name][0]["requests"]:
            assert (
                rec["finish_reason"] == "length" and rec["num_output_tokens"] == rec["output_len"]
            )
            assert rec["submitted_s"] <= rec["first_token_s"] <= rec["finished_s"]
    scls = doc["summary"]["scls"]
    assert scls["num_batches"] >= 2 and scls["oom_count"] == 0
    assert scls["cpu_s"] > 0 and scls["output_tokens_per_cpu_s"] > 0
    assert scls["mean_slices_per_request"] > 1  # outputs up to 24 tokens in slices of 8
    assert set(scls["per_worker"]) and scls["peak_measured_bytes"] <= scls["kv_budget_bytes"]
    assert doc["runs"]["scls"][0]["timeline"], "no stats snapshot was recorded"
    assert (out / "results.md").read_text().startswith("# Benchmark results")
    assert {p.name for p in out.glob("*.png")} >= {"throughput.png", "latency_cdf.png"}


@pytest.mark.timeout(90)
def test_bench_hidden_lengths(tiny_model_dir, tmp_path):
    """max_tokens = max_gen_len and the client cancels at each length: counts still match."""
    out = tmp_path / "hidden"
    code = bench_main([
        "--model", str(tiny_model_dir), "--no-profile", "--threads", "1", "--workers", "2",
        "--kv-budget", "4MiB", "--policies", "ils", "--peers", "hf_generate_batch",
        "--workload", "synthetic:prompt=uniform:8:24,output=uniform:4:24", "--num-requests", "6",
        "--max-gen-len", "64", "--lengths", "hidden", "--arrival", "closed:3", "--no-plots",
        "--out", str(out), "--max-duration", "60",
    ])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["workload"]["lengths"] == "hidden"
    for name in ("ils", "hf_generate_batch"):
        assert doc["summary"][name]["completed"] == 6, name
        for rec in doc["runs"][name][0]["requests"]:
            assert (
                rec["finish_reason"] == "length" and rec["num_output_tokens"] == rec["output_len"]
            )
    ils = doc["summary"]["ils"]
    assert ils["excess_tokens"] >= 0  # generated past the length before the cancel landed
    assert ils["mean_slices_per_request"] >= 1
