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
        (["--device-model", "/nonexistent/profile.json"], "/nonexistent/profile.json: no such"),
        (["--policies", "scls,fifo"], "unknown policy fifo: --policies takes sls,"),
        (["--policies", "hf_generate"], "simulate runs policies"),
        (["--policies", ""], "--policies is empty"),
        (["--instances", "0"], "--instances must be at least 1, got 0"),
        (["--noise", "-1"], "--noise must be at least 0, got -1"),
        (["--tick", "0"], "--tick must be above 0, got 0"),
        (["--max-duration", "-5"], "--max-duration must be above 0, got -5"),
        (["--step-scale", "0"], "--step-scale must be above 0"),
        (["--slow-worker", "0.5"], "--slow-worker must be at least 1"),
        (["--noise", "nan"], "--noise must be a finite number"),
        (["--noise", "inf"], "--noise must be a finite number"),
        (["--step-scale", "inf"], "--step-scale must be a finite number"),
        (["--step-scale", "nan"], "--step-scale must be a finite number"),
        (["--tick", "nan"], "--tick must be a finite number"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--max-output-len", "0"], "--max-output-len must be at least 1"),
        (["--max-prompt-len", "0"], "--max-prompt-len must be at least 1"),
        (
            ["--min-output-len", "5", "--max-output-len", "3"],
            "--max-output-len (3) is below --min-output-len (5)",
        ),  # fmt: skip
        (["--device-model", "h100-80gb:llama-3-8b:tp2:extra"], "nothing after tpN: 'extra'"),
        (["--device-model", "h100-80gb:llama-2-7b:tp3"], "32 attention heads do not split over 3"),
        (
            [
                "--instances",
                "2",
                "--device-model",
                "h200:llama-2-7b,a100-80gb:llama-2-7b,h200:llama-2-7b",
            ],
            "--device-model names 3 entries for 2 instance(s)",
        ),  # fmt: skip
        (["--slowdown-trace", ","], "--slowdown-trace ',': an entry is empty"),
        (["--kv-budget", "1MiB"], "--kv-budget 1MiB holds 8 tokens of llama-3-8b's KV"),
        (["--goodput", "ttft:10", "ttft:20"], "--goodput gives ttft twice"),
        (["--workload", "azure:"], "nothing after ':': pass azure:PATH"),
        (["--workload", "synthetic:"], "nothing after ':': pass synthetic:SPEC"),
        (["--workload", "azure:/"], "'/' is a directory: pass the path of an Azure trace file"),
        (["--bogus"], "(`run.py simulate --help` lists them)"),
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
    assert words in _one_error(args)


def _one_error(args: list[str]) -> str:
    """The one line of a simulate run refused with status 2."""
    out = subprocess.run(
        [sys.executable, str(RUN_PY), "simulate", "--num-requests", "5", "--no-plots", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    return lines[0]


def test_files_that_cannot_serve_are_named(tmp_path: Path) -> None:
    from engine.sim.devices import device_model

    for name, text in (("list.json", "[1, 2]"), ("text.json", '"profile"')):
        (tmp_path / name).write_text(text)
        for flag in ("--device-model", "--announced-model"):
            line = _one_error([flag, str(tmp_path / name), "--out", str(tmp_path / "o")])
            assert f"{flag} {tmp_path / name}: not a time-model profile (a JSON object" in line
    (tmp_path / "trace.csv").write_bytes(b"\xff\xfe\x00binary")
    line = _one_error(["--workload", f"azure:{tmp_path / 'trace.csv'}"])
    assert f"{tmp_path / 'trace.csv'} is not UTF-8 text" in line
    (tmp_path / "afile").write_text("")
    for out, words in (("afile", "a file, not a directory"), ("afile/sub", "cannot create it")):
        assert f"--out {tmp_path / out}: {words}" in _one_error(["--out", str(tmp_path / out)])
    device_model("a100-80gb:llama-2-7b").time_model.save(tmp_path / "profile.json")
    line = _one_error(
        ["--device-model", str(tmp_path / "profile.json"), "--kv-budget", "1MiB",
         "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert "--kv-budget 1MiB cannot hold a single request" in line
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_the_header_counts_each_device_model(tmp_path: Path, capsys) -> None:
    args = ["simulate", "--policies", "scls", "--instances", "3", "--num-requests", "5",
            "--device-model", "a100-80gb:llama-2-7b,h200:llama-2-7b", "--no-plots",
            "--max-output-len", "4", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "on 2 x a100-80gb:llama-2-7b, 1 x h200:llama-2-7b, entries scls" in head, head
    text = (tmp_path / "results.md").read_text()
    assert "5 requests" in text and "clipped to None" not in text
    assert "prompt not clipped" in text and "output clipped to 4 (" in text


def test_the_report_counts_in_words() -> None:
    from engine.bench import report

    scaling = {"max_prompt_len": None, "num_prompts_clipped": 10, "max_output_len": 9,
               "num_outputs_clipped": 0}  # fmt: skip
    lines = report._workload_lines({"description": {"num_requests": 1, "scaling": scaling}}, {})
    text = "\n".join(lines)
    assert "1 request," in text and "prompt clipped to fit the context (10 clipped)" in text
    assert "1 worker x" in "\n".join(report._setup_lines({"num_workers": 1, "entries": ["sls"]}))


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
