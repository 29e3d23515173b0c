"""`run.py simulate` as a user runs it: bench's outputs from a simulated cluster, the same JSON
for the same seed, and one line with exit status 2 for a mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.cost_model import TimeModel

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"
ARGS = [
    "simulate", "--policies", "scls,ils,sls", "--instances", "2",
    "--device-model", "a100-80gb:llama-2-7b,h200:llama-2-7b", "--num-requests", "60",
    "--arrival", "poisson:20", "--max-gen-len", "256", "--slice-len", "32",
    "--lengths", "hidden", "--noise", "0.1", "--seed", "4",
]  # fmt: skip


def _strip(doc: dict) -> dict:
    """The document without what differs between two identical runs: its creation time, the
    seconds each simulation took on this machine and the CPU seconds its broker core took."""
    doc = dict(doc)
    doc.pop("created")
    for runs in doc["runs"].values():
        for run in runs:
            run.pop("wall_s")
            assert run["extra"]["sim"].pop("broker_cpu_s") > 0
    return doc


def test_simulate_writes_bench_results_and_is_deterministic(tmp_path: Path) -> None:
    assert main([*ARGS, "--out", str(tmp_path / "a")]) == 0
    assert main([*ARGS, "--out", str(tmp_path / "b"), "--no-plots"]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert _strip(a)["runs"] == _strip(b)["runs"] and a["summary"] == b["summary"]
    assert list(a["summary"]) == ["scls", "ils", "sls"]
    for name, summary in a["summary"].items():
        assert summary["completed"] == 60, name
        for key in ("request_throughput", "mean_ttft_ms", "p99_e2el_ms", "load_imbalance"):
            assert summary[key] is not None, (name, key)
    assert a["config"]["device_models"] == ["a100-80gb:llama-2-7b", "h200:llama-2-7b"]
    text = (tmp_path / "a" / "results.md").read_text()
    assert text.startswith("# Simulation results") and "**simulated**" in text
    load = text.split("## The broker at this pace")[1].split("\n## ")[0].splitlines()
    rows = [line.split(" | ") for line in load if line.startswith("| ") and "CPU" not in line]
    assert [r[0] for r in rows] == ["| scls", "| ils", "| sls"]  # a row per run
    assert all(float(r[2]) > 0 and float(r[3].rstrip(" |")) >= 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert not list((tmp_path / "b").glob("*.png"))


def test_a_different_seed_changes_a_noisy_run(tmp_path: Path) -> None:
    args = [*ARGS[:-1], "5", "--policies", "scls", "--no-plots"]
    assert main([*args, "--out", str(tmp_path / "c")]) == 0
    assert main([*ARGS, "--policies", "scls", "--no-plots", "--out", str(tmp_path / "d")]) == 0
    c = json.loads((tmp_path / "c" / "results.json").read_text())
    d = json.loads((tmp_path / "d" / "results.json").read_text())
    assert c["summary"]["scls"]["mean_ttft_ms"] != d["summary"]["scls"]["mean_ttft_ms"]


def test_the_broker_plans_with_the_announced_model(tmp_path: Path) -> None:
    """--announced-model: the instances announce a model twice as slow as their steps, so the
    broker (not refining it) predicts twice as long for what the batches take."""
    from engine.sim.devices import device_model

    true = device_model("a100-80gb:llama-2-7b").time_model
    slow = TimeModel([2 * c for c in true.prefill], [2 * c for c in true.decode])
    slow.save(tmp_path / "slow.json")
    base = [
        "simulate", "--policies", "scls", "--instances", "2", "--device-model",
        "a100-80gb:llama-2-7b", "--num-requests", "60", "--arrival", "poisson:20",
        "--max-gen-len", "256", "--slice-len", "32", "--seed", "4", "--no-plots", "--no-refine",
    ]  # fmt: skip
    ratios = []
    for name, extra in (("own", []), ("slow", ["--announced-model", str(tmp_path / "slow.json")])):
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        doc = json.loads((tmp_path / name / "results.json").read_text())
        batches = doc["runs"]["scls"][0]["batches"]
        ratios.append(
            sum(b["predicted_s"] for b in batches) / sum(b["measured_s"] for b in batches)
        )
    # (a dispatch's prediction is its own slice; what it measures spans the joins around it)
    assert ratios[1] == pytest.approx(2 * ratios[0], rel=0.2), ratios


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--instances", "0"], "--instances must be at least 1"),
        (["--device-model", "v100:llama-2-7b"], "GPU:MODEL"),
        (["--device-model", "a100-80gb:llama-2-70b"], "tpN"),
        (["--device-model", "/nonexistent/profile.json"], "not a time-model profile"),
        (["--policies", "scls,fifo"], "unknown policy"),
        (["--device-model", "h200:llama-2-7b,h200:llama-3-8b"], "mixes llama-2-7b and llama-3-8b"),
        (["--policy", "ils"], "--policies"),
        (["--workload", "azure:/nonexistent.csv"], "nonexistent"),
        (["--baseline", "fifo"], "--baseline"),
        (["--announced-model", "/nonexistent/profile.json"], "--announced-model"),
        (["--slowdown-trace", "/nonexistent/trace.json"], "--slowdown-trace"),
        (["--slowdown-trace", str(RUN_PY)], "not JSON"),
    ],
)
def test_a_mistake_is_one_line_and_status_2(args: list[str], words: str) -> None:
    out = subprocess.run(
        [sys.executable, str(RUN_PY), "simulate", "--num-requests", "5", "--no-plots", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], out.stderr


def test_the_noise_seed_varies_the_noise_alone(tmp_path: Path) -> None:
    """--noise-seed: the same synthetic workload (drawn from --seed), other step-time noise."""
    args = [*ARGS, "--policies", "scls", "--no-plots"]
    docs = []
    for name, noise_seed in (("e", "1"), ("f", "2")):
        assert main([*args, "--noise-seed", noise_seed, "--out", str(tmp_path / name)]) == 0
        docs.append(json.loads((tmp_path / name / "results.json").read_text()))
    lengths = [
        sorted(
            (r["index"], r["prompt_len"], r["output_len"]) for r in d["runs"]["scls"][0]["requests"]
        )
        for d in docs
    ]
    assert lengths[0] == lengths[1]
    assert docs[0]["summary"]["scls"]["mean_ttft_ms"] != docs[1]["summary"]["scls"]["mean_ttft_ms"]
    assert [d["config"]["noise_seed"] for d in docs] == [1, 2]
