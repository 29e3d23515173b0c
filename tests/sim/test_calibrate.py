"""The calibration command: a recorded bench command becomes the same simulation, and the table
compares what was measured with what was simulated."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from engine.bench.calibrate import (
    compare,
    contention,
    read_step_log,
    simulate_args,
    within,
    write_block,
)
from engine.bench.calibrate import (
    main as calibrate_main,
)
from engine.cli import main
from engine.cost_model import TimeModel
from engine.sim.devices import ProfileTimer, SlowdownTrace, StepShape

COMMAND = (
    "run.py --log-level WARNING bench --model embedded --workers 3 --threads 1 --kv-budget 48MiB "
    "--policies sls,scls --lengths hidden --workload synthetic:prompt=uniform:24:56,output=40 "
    "--output-divisor 4 --max-gen-len 256 --slice-len 32 --num-requests 48 --seed 7 "
    "--arrival poisson:3 --max-duration 360 --out bench-x"
)


def test_a_bench_command_becomes_the_same_simulation(tmp_path: Path) -> None:
    args = simulate_args(COMMAND, "h200:llama-2-7b", tmp_path)
    assert (args.instances, args.kv_budget, args.policies) == (3, 48 * 2**20, "sls,scls")
    assert (args.lengths, args.max_gen_len, args.slice_len, args.seed) == ("hidden", 256, 32, 7)
    assert (args.arrival, args.output_divisor, args.num_requests) == ("poisson:3", 4.0, 48)
    assert args.workload == "synthetic:prompt=uniform:24:56,output=40"
    assert args.device_model == "h200:llama-2-7b" and args.out == tmp_path


def test_the_table_and_its_block(tmp_path: Path) -> None:
    real = {
        "config": {"num_workers": 2},
        "summary": {"scls": {"request_throughput": 1.0, "mean_ttft_ms": 200.0, "p99_e2el_ms": 900.0,
                             "cpu_s": 50.0, "duration_s": 50.0, "loadavg_1m": 1.5}},
    }  # fmt: skip
    sim = {
        "summary": {
            "scls": {"request_throughput": 1.1, "mean_ttft_ms": 150.0, "p99_e2el_ms": 990.0}
        }
    }
    table = compare(real, sim)
    row = table.splitlines()[2]
    assert row.split(" | ")[1:4] == ["1.5", "0.50", "1.000"]
    assert "+10.0%" in row and "-25.0%" in row and "| 2.000 | -45.0% |" in row
    doc = tmp_path / "doc.md"
    doc.write_text("a\n<!-- calibration:x -->\nold\n<!-- /calibration:x -->\nb\n")
    write_block(doc, "x", table)
    assert doc.read_text() == f"a\n<!-- calibration:x -->\n{table}\n<!-- /calibration:x -->\nb\n"


def test_a_step_log_becomes_samples_timed_by_their_period(tmp_path: Path) -> None:
    """A step followed back to back costs its period (the loop's own work included); one
    followed by idle time costs what it measured; each shape goes to its kind."""
    lines = [
        {"at": 10.0, "rows": 0, "context": 0, "prefill_rows": 2, "prefill_len": 40,
         "forward_s": 0.09, "step_s": 0.1},
        {"at": 10.102, "rows": 2, "context": 41, "prefill_rows": 0, "prefill_len": 0,
         "forward_s": 0.04, "step_s": 0.05},
        {"at": 11.0, "rows": 2, "context": 42, "prefill_rows": 1, "prefill_len": 30,
         "forward_s": 0.07, "step_s": 0.08},
    ]  # fmt: skip
    log = tmp_path / "w.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prefill, decode, mixed = read_step_log(log)
    assert prefill == [(2, 40, pytest.approx(0.102))]
    assert decode == [(2, 41, 0.05)]  # the next step came 0.848 s after its end: idle between
    assert mixed == [(2, 42, 1, 30, 0.08)]


def test_fitting_a_run_recovers_its_step_times_from_any_prior() -> None:
    """Steps timed by a known model (decode, prefill and mixed, as the simulator times them)
    fit back to that model, though the prior says otherwise."""
    true = TimeModel(prefill=(1.5e-3, 4e-3, 2e-5, 0.03, 1e-6), decode=(3e-6, 3e-3, 1e-5, 0.05))
    timer = ProfileTimer(true)
    rng = random.Random(0)
    decode, prefill, mixed = [], [], []
    for _ in range(300):
        n, c = rng.randint(1, 48), rng.randint(20, 400)
        decode.append((n, c, timer.step_s(StepShape(n, n * c))))
        p, ln = rng.randint(1, 8), rng.randint(16, 256)
        prefill.append((p, ln, timer.step_s(StepShape(0, 0, [(0, ln)] * p))))
        mixed.append((n, c, p, ln, timer.step_s(StepShape(n, n * c, [(0, ln)] * p))))
    fitted = TimeModel.fit_measured(TimeModel.default(), prefill[:40], decode, mixed)
    for n, c in ((1, 30), (16, 200), (40, 380)):
        assert fitted.decode_step_s(n, c) == pytest.approx(true.decode_step_s(n, c), rel=0.03)
    for p, ln in ((1, 32), (4, 128), (8, 250)):
        assert fitted.prefill_s(p, ln) == pytest.approx(true.prefill_s(p, ln), rel=0.05)
    fitted_timer = ProfileTimer(fitted)
    shape = StepShape(20, 20 * 150, [(0, 100)] * 3)
    assert fitted_timer.step_s(shape) == pytest.approx(timer.step_s(shape), rel=0.03)


def test_the_table_of_runs_simulated_on_their_own_steps() -> None:
    real = {
        "config": {"num_workers": 2},
        "summary": {"scls": {"request_throughput": 1.0, "mean_ttft_ms": 200.0, "p99_e2el_ms": 900.0,
                             "cpu_s": 50.0, "duration_s": 50.0, "loadavg_1m": 1.5}},
    }  # fmt: skip
    sim = {"summary": {"scls": {"request_throughput": 0.95, "mean_ttft_ms": 210.0,
                                "p99_e2el_ms": 900.0}}}  # fmt: skip
    head, _, row = compare(real, sim, {"scls": 1.234}).splitlines()
    assert head.endswith("| steps / profile |") and "req/s real / share" not in head
    assert row.endswith("| -5.0% | 200 | 210 | +5.0% | 900 | 900 | +0.0% | 1.23x |")


def test_contention_is_measured_over_predicted_per_window() -> None:
    """Steps that took twice the model's time in the second window, none in the fourth."""
    model = TimeModel(prefill=(1e-3, 0.0, 0.0, 0.01, 0.0), decode=(0.0, 1e-3, 0.0, 0.02))
    timer = ProfileTimer(model)
    steps = []
    for i in range(40):  # 4 per second over 10 s, starting at 100.0
        at = 100.0 + i * 0.25
        factor = 2.0 if 2.0 <= at - 100.0 < 4.0 else 1.0
        if 6.0 <= at - 100.0 < 8.0:
            continue
        steps.append((at, "decode", (4, 50, factor * timer.step_s(StepShape(4, 200)))))
    trace = contention(steps, timer, origin=100.0, window_s=2.0)
    assert trace.factors == pytest.approx((1.0, 2.0, 1.0, 1.0, 1.0))
    assert trace.at(3.0) == 2.0 and trace.at(-1.0) == trace.at(50.0) == 1.0


def test_a_slowdown_trace_of_a_constant_is_a_step_scale(tmp_path: Path) -> None:
    """Every instance slowed 3x by its trace runs exactly as --step-scale 3 runs it."""
    (tmp_path / "x3.json").write_text(json.dumps(SlowdownTrace(1000.0, (3.0,)).to_json()))
    base = [
        "simulate", "--policies", "scls", "--instances", "2", "--device-model",
        "a100-80gb:llama-2-7b", "--num-requests", "40", "--arrival", "poisson:20",
        "--max-gen-len", "256", "--slice-len", "32", "--seed", "4", "--no-plots",
    ]  # fmt: skip
    assert main([*base, "--step-scale", "3", "--out", str(tmp_path / "a")]) == 0
    trace = str(tmp_path / "x3.json")
    assert main([*base, "--slowdown-trace", trace, "--out", str(tmp_path / "b")]) == 0
    assert main([*base, "--out", str(tmp_path / "c")]) == 0
    a, b, c = (json.loads((tmp_path / x / "results.json").read_text()) for x in "abc")
    assert a["summary"] == b["summary"] != c["summary"]


def test_cells_within_ten_percent_are_counted_from_the_metric_errors() -> None:
    real = {"summary": {
        "a": {"request_throughput": 1.0, "mean_ttft_ms": 100.0, "p99_e2el_ms": 100.0},
        "b": {"request_throughput": 1.0, "mean_ttft_ms": None, "p99_e2el_ms": 100.0},
        "c": {"request_throughput": 1.0, "mean_ttft_ms": 1.0, "p99_e2el_ms": 1.0},
    }}  # fmt: skip
    sim = {"summary": {
        "a": {"request_throughput": 1.099, "mean_ttft_ms": 89.9, "p99_e2el_ms": None},
        "b": {"request_throughput": 1.0, "mean_ttft_ms": 100.0, "p99_e2el_ms": 150.0},
    }}  # fmt: skip
    assert within(real, sim) == (2, 4)


def test_calibrate_simulates_each_policy_run_on_its_own_steps(tmp_path: Path, capsys) -> None:
    """End to end on a recorded bench (its results.json and step logs written here): each
    policy run is fitted and simulated, a peer (no step log) is left out, and the table says
    how much slower than the profile the run's steps were."""
    prior = TimeModel.default()
    prior.save(tmp_path / "profile.json")
    slow = ProfileTimer(
        TimeModel([1.5 * c for c in prior.prefill], [1.5 * c for c in prior.decode])
    )
    steps_dir = tmp_path / "steps"
    for worker in ("w0", "w1"):
        lines, at = [], 100.0
        for i in range(60):
            rows, context = 1 + i % 6, 30 + i
            step_s = slow.step_s(StepShape(rows, rows * context))
            lines.append({"at": at, "rows": rows, "context": context, "prefill_rows": 0,
                          "prefill_len": 0, "forward_s": step_s, "step_s": step_s})  # fmt: skip
            at += step_s
        (steps_dir / "scls-1").mkdir(parents=True, exist_ok=True)
        log = steps_dir / "scls-1" / f"{worker}.jsonl"
        log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = {"request_throughput": 1.0, "mean_ttft_ms": 500.0, "p99_e2el_ms": 5000.0}
    real = {
        "command": "run.py bench --model embedded --workers 2 --kv-budget 48MiB --policies scls "
        "--peers hf --workload synthetic:prompt=uniform:24:56,output=20 --max-gen-len 64 "
        "--slice-len 16 --num-requests 12 --seed 0 --out x",
        "config": {"num_workers": 2, "step_log_dir": str(steps_dir)},
        "summary": {"scls": summary, "hf": summary},
        "runs": {"scls": [{"kind": "policy", "summary": summary}],
                 "hf": [{"kind": "peer", "summary": summary}]},
    }  # fmt: skip
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps(real))
    out = tmp_path / "sim"
    argv = [str(tmp_path / "bench"), "--device-model", str(tmp_path / "profile.json")]
    assert calibrate_main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].endswith("| steps / profile |") and len(rows) == 2  # the head, scls
    assert rows[1].startswith("| scls |") and rows[1].endswith("| 1.50x |")
    assert "of 3 cells within 10%" in table
    models = sorted(p.name for p in (out / "models" / "scls-1").iterdir())
    assert models == ["w0.json", "w0.slowdown.json", "w1.json", "w1.slowdown.json"]
    fitted = TimeModel.load_cached(out / "models" / "scls-1" / "w0.json")
    assert fitted is not None and fitted.decode_step_s(4, 60) == pytest.approx(
        1.5 * prior.decode_step_s(4, 60), rel=0.02
    )


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: None, "results.json: cannot read it"),
        (lambda d: (d / "results.json").write_text("{oops"), "not JSON"),
        (lambda d: (d / "results.json").write_text("{}"), "not a bench's results.json"),
    ],
)
def test_a_mistake_is_one_line_and_status_2(tmp_path: Path, capsys, make, words: str) -> None:
    make(tmp_path)
    assert calibrate_main([str(tmp_path), "--device-model", "x.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_a_simulate_dir_or_no_argument_is_one_line(tmp_path: Path, capsys) -> None:
    """calibrate wants a bench's --out DIR: a simulate's is refused in one line, status 2."""
    args = ["simulate", "--policies", "scls", "--num-requests", "5", "--no-plots",
            "--out", str(tmp_path / "sim")]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    profile = tmp_path / "p.json"
    TimeModel((1e-3, 0.0, 0.0, 0.01, 0.0), (0.0, 1e-3, 0.0, 0.02)).save(profile)
    assert calibrate_main([str(tmp_path / "sim"), "--device-model", str(profile)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1 and "not a bench: give the --out DIR of a `run.py bench --step-log" in err[0]
    )
    with pytest.raises(SystemExit) as exit_:
        calibrate_main([])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "`run.py bench --step-log DIR`" in err[0]
