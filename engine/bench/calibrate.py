"""The simulator against the real engine: ``python -m engine.bench.calibrate BENCH_DIR
--device-model PROFILE.json`` reruns a finished `run.py bench` (its results.json records the
command) as `run.py simulate` with the same load and scheduling flags and one simulated instance
per worker, and prints, per policy, the measured and simulated request throughput, mean TTFT
and p99 end-to-end latency with their errors; ``--doc FILE --name NAME`` also writes that table
between ``<!-- calibration:NAME -->`` and ``<!-- /calibration:NAME -->`` in FILE."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from engine.bench.cli import add_bench_parser
from engine.bench.simulate import add_simulate_parser, run_simulate

METRICS = (("request_throughput", "req/s", "{:.3f}"), ("mean_ttft_ms", "mean TTFT ms", "{:.0f}"),
           ("p99_e2el_ms", "p99 e2e ms", "{:.0f}"))  # fmt: skip


def simulate_args(bench_command: str, device_model: str, out: Path) -> argparse.Namespace:
    """The `simulate` flags of a recorded `bench` command: every flag the two share, the
    policies it ran, one instance per worker."""
    words = shlex.split(bench_command)
    bench_argv = words[words.index("bench") + 1 :]
    bench = argparse.ArgumentParser()
    add_bench_parser(bench)
    given = vars(bench.parse_args(bench_argv))
    sim = argparse.ArgumentParser()
    add_simulate_parser(sim)
    args = sim.parse_args([])
    for key in vars(args):
        if key in given and key not in ("out", "policies"):
            setattr(args, key, given[key])
    args.policies = given["policies"] or "sls,ils,scls"
    args.instances = given["workers"]
    args.device_model = device_model
    args.out = out
    args.no_plots = True
    args.argv = ["simulate", "(from)", *bench_argv]
    return args


def error(sim: float | None, real: float | None) -> str:
    if sim is None or real is None or real == 0:
        return "n/a"
    return f"{(sim - real) / real * 100:+.1f}%"


def cpu_share(summary: dict, num_workers: int) -> float | None:
    """The share of a core each worker had during the run: its CPU seconds over the run's
    duration (1.0 on a quiet machine with a core per worker and work always queued)."""
    cpu_s, duration_s = summary.get("cpu_s"), summary.get("duration_s")
    if not cpu_s or not duration_s:
        return None
    return cpu_s / (num_workers * duration_s)


def compare(real: dict, sim: dict) -> str:
    """A Markdown table: per policy, each metric measured, simulated and the error, and the
    measured throughput divided by the workers' CPU share (what they would have served with
    a core each: the simulator models dedicated devices)."""
    head = ["policy", "load", "CPU share"]
    head += [f"{label} {kind}" for _, label, _ in METRICS for kind in ("real", "sim", "error")]
    head += ["req/s real / share", "error"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    num_workers = real["config"].get("num_workers") or 1
    for name, measured in real["summary"].items():
        simulated = sim["summary"].get(name)
        if simulated is None:
            continue
        share = cpu_share(measured, num_workers)
        load = measured.get("loadavg_1m")
        cells = [name, f"{load:.1f}" if load else "n/a", f"{share:.2f}" if share else "n/a"]
        for key, _, fmt in METRICS:
            r, s = measured.get(key), simulated.get(key)
            cells += [fmt.format(r) if r is not None else "n/a"]
            cells += [fmt.format(s) if s is not None else "n/a", error(s, r)]
        r, s = measured.get("request_throughput"), simulated.get("request_throughput")
        fair = r / share if r is not None and share else None
        cells += [f"{fair:.3f}" if fair is not None else "n/a", error(s, fair)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_block(doc: Path, name: str, text: str) -> None:
    start, end = f"<!-- calibration:{name} -->", f"<!-- /calibration:{name} -->"
    content = doc.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"error: {doc} has no {start} ... {end} block to fill")
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    doc.write_text(f"{before}{start}\n{text}\n{end}{after}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench.calibrate", description=__doc__)
    ap.add_argument("bench_dir", type=Path, help="a bench results directory (results.json)")
    ap.add_argument("--device-model", required=True, help="the workers' profile JSON")
    ap.add_argument(
        "--out", type=Path, default=None, help="simulation results (default BENCH_DIR-sim)"
    )
    ap.add_argument(
        "--doc", type=Path, default=None, help="a Markdown file to write the table into"
    )
    ap.add_argument("--name", default=None, help="the block's name in --doc")
    ap.add_argument("--step-scale", type=float, default=1.0, help="simulate's --step-scale")
    args = ap.parse_args(argv)
    real = json.loads((args.bench_dir / "results.json").read_text())
    out = args.out or args.bench_dir.with_name(args.bench_dir.name + "-sim")
    sim_args = simulate_args(real["command"], args.device_model, out)
    sim_args.step_scale = args.step_scale
    run_simulate(sim_args)
    sim = json.loads((out / "results.json").read_text())
    table = compare(real, sim)
    print(table)
    if args.doc is not None:
        write_block(args.doc, args.name or args.bench_dir.name, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
