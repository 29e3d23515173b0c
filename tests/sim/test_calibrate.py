"""The calibration command: a recorded bench command becomes the same simulation, and the table
compares what was measured with what was simulated."""

from __future__ import annotations

from pathlib import Path

from engine.bench.calibrate import compare, simulate_args, write_block

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
