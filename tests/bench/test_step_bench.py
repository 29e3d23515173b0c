"""The step benchmark on the tiny random model: the JSON's shape and both figures positive
(speed itself stays in the benchmark, not in a timed test)."""

from __future__ import annotations

import json

import pytest

from engine.bench import step_bench
from engine.bench.step_bench import Shape, StepBenchError


def test_shapes_and_flags():
    assert Shape(3, 24).contexts() == [24, 24, 24]
    assert Shape(4, 40, mixed=True).contexts() == [10, 20, 30, 40]
    assert Shape(1, 40, mixed=True).contexts() == [40]
    assert Shape(4, 40, mixed=True).label == "4 x 10..40" and Shape(4, 40).label == "4 x 40"
    assert step_bench.parse_ints("1, 4,16", "--batches") == [1, 4, 16]
    for bad in ("", "0,4", "a"):
        with pytest.raises(StepBenchError, match="positive whole numbers"):
            step_bench.parse_ints(bad, "--batches")


@pytest.mark.timeout(60)
def test_step_bench_tiny(tmp_path, capsys):
    out = tmp_path / "steps.json"
    code = step_bench.main([
        "--model", "tiny", "--batches", "1,3", "--contexts", "8,24", "--mixed", "--steps", "2",
        "--repeats", "2", "--threads", "1", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == "tiny" and doc["steps"] == 2 and doc["repeats"] == 2
    assert doc["command"].startswith("python -m engine.bench.step_bench --model tiny")
    machine = doc["machine"]
    assert machine["cpu_model"] and machine["torch_threads"] == 1
    assert isinstance(machine["vector_extensions"], list) and isinstance(machine["amx"], bool)
    shapes = [(r["batch"], r["context"], r["mixed"]) for r in doc["results"]]
    assert shapes == [(1, 8, False), (3, 8, False), (1, 24, False), (3, 24, False),
                      (3, 8, True), (3, 24, True)]  # fmt: skip
    for r in doc["results"]:
        assert r["bare_tokens_per_s"] > 0 and r["engine_tokens_per_s"] > 0, r
        assert r["engine_over_bare"] > 0 and r["engine_step_ms"] > 0
        assert len(r["bare_windows_step_ms"]) == len(r["engine_windows_step_ms"]) == 2
        assert r["engine_step_ms"] == min(r["engine_windows_step_ms"])  # the fastest window
        assert r["engine_step_ms"] <= r["engine_mean_step_ms"] <= r["engine_max_step_ms"]
        assert len(r["contexts"]) == r["batch"]
        if r["forward_method"] is not None:  # the runner's forward pass was timed
            assert 0 < r["engine_forward_ms"] <= r["engine_step_ms"]
            assert r["engine_overhead_ms"] is not None
        assert r["same_greedy_tokens"], r  # float32, greedy: the engine changes no token
    assert doc["results"][4]["contexts"] == [2, 5, 8]
    text = capsys.readouterr().out
    assert "| batch x context | bare tok/s | engine tok/s |" in text and "| 3 x 6..24 |" in text


def test_step_bench_refuses_contexts_past_the_model(capsys):
    code = step_bench.main(["--model", "tiny", "--batches", "1", "--contexts", "5000"])
    assert code == 2
    assert "the model accepts 4096" in capsys.readouterr().err
