"""The simulator against the real engine: ``python -m engine.bench.calibrate BENCH_DIR
--device-model PROFILE.json`` reruns a finished `run.py bench` (its results.json records the
command) as `run.py simulate` with the same load and scheduling flags and one simulated instance
per worker, and prints, per policy, the measured and simulated request throughput, mean TTFT
and p99 end-to-end latency with their errors; ``--doc FILE --name NAME`` also writes that table
between ``<!-- calibration:NAME -->`` and ``<!-- /calibration:NAME -->`` in FILE.

When the bench ran with ``--step-log DIR`` (every worker logs each forward's shape and
seconds), each policy is simulated on the step times its own run measured: one device model
per worker, fitted on all that worker's steps of that run (``TimeModel.fit_measured``, with
PROFILE.json as the prior), as Vidur profiles the target machine before simulating it. That
separates what the simulator models (scheduling, the worker's contract) from what it is given
(how long a step takes on a machine shared with other work)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from engine.bench.cli import add_bench_parser
from engine.bench.simulate import add_simulate_parser, run_simulate
from engine.cli_base import Parser, UsageError, rephrase
from engine.cost_model import TimeModel
from engine.sim.devices import (
    DeviceModelError,
    ProfileTimer,
    SlowdownTrace,
    StepShape,
    load_profile,
)


class CalibrationError(Exception):
    """A mistake in what calibrate was given: one line, exit status 2."""


#: a step that began within this long of the previous one's end followed it back to back: its
#: period (start to next start: the worker loop's own work included) is what the step cost
BACK_TO_BACK_S = 0.005

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


def timed_steps(path: Path) -> list[tuple[float, str, tuple]]:
    """Each step of one worker's log as (when it began, kind, sample): "prefill" (p, l, s),
    "decode" (n, c, s) or "mixed" (n, c, p, l, s), its seconds its period when the next step
    followed back to back, else the step itself."""
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: list[tuple[float, str, tuple]] = []
    for step, nxt in zip(steps, [*steps[1:], None], strict=True):
        seconds = step["step_s"]
        if nxt is not None and nxt["at"] - (step["at"] + seconds) < BACK_TO_BACK_S:
            seconds = nxt["at"] - step["at"]
        if seconds <= 0:
            continue
        rows, context, p_rows, p_len = (
            step["rows"], step["context"], step["prefill_rows"], step["prefill_len"]
        )  # fmt: skip
        if rows and p_rows:
            out.append((step["at"], "mixed", (rows, context, p_rows, p_len, seconds)))
        elif rows:
            out.append((step["at"], "decode", (rows, context, seconds)))
        elif p_rows:
            out.append((step["at"], "prefill", (p_rows, p_len, seconds)))
    return out


def by_kind(steps: list[tuple[float, str, tuple]]) -> tuple[list, list, list]:
    """(prefill, decode, mixed) samples of ``timed_steps``."""
    kinds: dict[str, list] = {"prefill": [], "decode": [], "mixed": []}
    for _, kind, sample in steps:
        kinds[kind].append(sample)
    return kinds["prefill"], kinds["decode"], kinds["mixed"]


def read_step_log(path: Path) -> tuple[list, list, list]:
    """(prefill, decode, mixed) samples of one worker's step log."""
    return by_kind(timed_steps(path))


def predicted_s(timer: ProfileTimer, kind: str, sample: tuple) -> float:
    """What ``timer`` says a logged step takes."""
    if kind == "decode":
        n, c, _ = sample
        return timer.step_s(StepShape(n, n * c))
    if kind == "prefill":
        p, ln, _ = sample
        return timer.step_s(StepShape(0, 0, [(0, ln)] * p))
    n, c, p, ln, _ = sample
    return timer.step_s(StepShape(n, n * c, [(0, ln)] * p))


def contention(
    steps: list[tuple[float, str, tuple]], timer: ProfileTimer, origin: float, window_s: float
) -> SlowdownTrace:
    """The measured seconds of the steps that began in each window over what ``timer`` says
    they take (1 where no step began): the machine's other work, as the simulator replays it."""
    measured: dict[int, float] = {}
    predicted: dict[int, float] = {}
    for at, kind, sample in steps:
        k = int((at - origin) // window_s)
        measured[k] = measured.get(k, 0.0) + sample[-1]
        predicted[k] = predicted.get(k, 0.0) + predicted_s(timer, kind, sample)
    num = max(measured, default=-1) + 1
    factors = tuple(
        measured[k] / predicted[k] if predicted.get(k, 0.0) > 0 else 1.0 for k in range(num)
    )
    return SlowdownTrace(window_s, factors)


def fit_step_logs(
    run_dir: Path, prior_path: str, out_dir: Path, window_s: float | None = None
) -> tuple[list[str], list[str], float]:
    """Per worker log in ``run_dir``, a profile JSON fitted on its steps (``prior_path``'s
    samples as the prior) and, given ``window_s``, its contention over the run (a slowdown
    trace, from the run's first step), written under ``out_dir``: their paths, and how much
    longer the run's steps took than the prior says (measured over predicted, all workers)."""
    try:
        prior = load_profile(prior_path, "--device-model")
    except DeviceModelError as exc:
        raise CalibrationError(str(exc)) from None
    logs = sorted(run_dir.glob("*.jsonl"))
    if not logs:
        raise CalibrationError(f"no step log (*.jsonl) in {run_dir}: run bench with --step-log")
    runs = [timed_steps(log_path) for log_path in logs]
    origin = min((steps[0][0] for steps in runs if steps), default=0.0)
    models, traces, measured, by_prior = [], [], 0.0, 0.0
    for log_path, steps in zip(logs, runs, strict=True):
        model = TimeModel.fit_measured(prior, *by_kind(steps))
        target = out_dir / f"{log_path.stem}.json"
        model.save(target)
        models.append(str(target))
        if window_s is not None:
            trace = contention(steps, ProfileTimer(model), origin, window_s)
            trace_path = out_dir / f"{log_path.stem}.slowdown.json"
            trace_path.write_text(json.dumps(trace.to_json()) + "\n")
            traces.append(str(trace_path))
        measured += sum(sample[-1] for _, _, sample in steps)
        by_prior += sum(predicted_s(ProfileTimer(prior), k, sample) for _, k, sample in steps)
    return models, traces, measured / by_prior if by_prior > 0 else 1.0


def simulate_quietly(sim_args: argparse.Namespace, out: Path) -> None:
    """`run.py simulate`, its report and progress appended to OUT/simulate.log, not printed."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "simulate.log").open("a") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            run_simulate(sim_args)


def within(real: dict, sim: dict, limit_pct: float = 10.0) -> tuple[int, int]:
    """(cells within ``limit_pct``, cells): the metrics of the policies both ran."""
    errors = [
        relative_error(simulated.get(key), measured.get(key))
        for name, measured in real["summary"].items()
        if (simulated := sim["summary"].get(name)) is not None
        for key, _, _ in METRICS
    ]
    known = [e for e in errors if e is not None]
    return sum(abs(e) <= limit_pct for e in known), len(known)


def relative_error(sim: float | None, real: float | None) -> float | None:
    """(sim - real) / real in percent; None when either is unknown or real is 0."""
    if sim is None or real is None or real == 0:
        return None
    return (sim - real) / real * 100


def error(sim: float | None, real: float | None) -> str:
    pct = relative_error(sim, real)
    return "n/a" if pct is None else f"{pct:+.1f}%"


def cpu_share(summary: dict, num_workers: int) -> float | None:
    """The share of a core each worker had during the run: its CPU seconds over the run's
    duration (1.0 on a quiet machine with a core per worker and work always queued)."""
    cpu_s, duration_s = summary.get("cpu_s"), summary.get("duration_s")
    if not cpu_s or not duration_s:
        return None
    return cpu_s / (num_workers * duration_s)


def compare(real: dict, sim: dict, step_factors: dict[str, float] | None = None) -> str:
    """A Markdown table: per policy, each metric measured, simulated and the error; then, when
    each run was simulated on its own steps, how much longer those steps took than the profile
    (``step_factors``), else the measured throughput divided by the workers' CPU share (what
    they would have served with a core each: the simulator models dedicated devices)."""
    head = ["policy", "load", "CPU share"]
    head += [f"{label} {kind}" for _, label, _ in METRICS for kind in ("real", "sim", "error")]
    head += ["steps / profile"] if step_factors is not None else ["req/s real / share", "error"]
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
        if step_factors is not None:
            factor = step_factors.get(name)
            cells += [f"{factor:.2f}x" if factor is not None else "n/a"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        r, s = measured.get("request_throughput"), simulated.get("request_throughput")
        fair = r / share if r is not None and share else None
        cells += [f"{fair:.3f}" if fair is not None else "n/a", error(s, fair)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_block(doc: Path, name: str, text: str) -> None:
    start, end = f"<!-- calibration:{name} -->", f"<!-- /calibration:{name} -->"
    content = doc.read_text()
    if start not in content or end not in content:
        raise CalibrationError(f"{doc} has no {start} ... {end} block to fill")
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    doc.write_text(f"{before}{start}\n{text}\n{end}{after}")


BENCH_RUN = "a `run.py bench --step-log DIR` run"


class _Parser(Parser):
    """One line for a mistake, saying what BENCH_DIR must be."""

    def error(self, message: str) -> NoReturn:
        print(
            f"error: {rephrase(message)}: usage: {self.prog} BENCH_DIR --device-model "
            f"PROFILE.json, BENCH_DIR the --out DIR of {BENCH_RUN}",
            file=sys.stderr,
        )
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="python -m engine.bench.calibrate", description=__doc__)
    ap.add_argument("bench_dir", type=Path, help=f"the --out DIR of {BENCH_RUN} (its results.json)")
    ap.add_argument("--device-model", required=True, help="the workers' profile JSON")
    ap.add_argument(
        "--out", type=Path, default=None, help="simulation results (default BENCH_DIR-sim)"
    )
    ap.add_argument(
        "--doc", type=Path, default=None, help="a Markdown file to write the table into"
    )
    ap.add_argument("--name", default=None, help="the block's name in --doc")
    ap.add_argument("--step-scale", type=float, default=1.0, help="simulate's --step-scale")
    ap.add_argument(
        "--contention-window",
        type=float,
        default=2.0,
        metavar="S",
        help="with step logs: replay how much slower than their fitted model each worker's "
        "steps ran, per window of S seconds (0: only the fitted model)",
    )
    ap.add_argument(
        "--step-log",
        type=Path,
        default=None,
        help="the bench's --step-log DIR (default: as its results.json records; 'none': "
        "simulate every policy on --device-model as it is)",
    )
    args = ap.parse_args(argv)
    try:
        return calibrate(args)
    except (CalibrationError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def read_results(bench_dir: Path) -> dict:
    path = bench_dir / "results.json"
    try:
        real = json.loads(path.read_text())
    except OSError as exc:
        raise CalibrationError(
            f"{path}: cannot read it ({exc.strerror}): give the --out DIR of {BENCH_RUN}"
        ) from None
    except ValueError:
        raise CalibrationError(f"{path}: not JSON: give a bench's --out DIR") from None
    if not isinstance(real, dict) or not {"command", "config", "summary", "runs"} <= set(real):
        raise CalibrationError(
            f"{path}: not a bench's results.json (command, config, summary, runs)"
        )
    words = shlex.split(str(real["command"]))
    if "bench" not in words:
        raise CalibrationError(
            f"{path} records `{shlex.join(words[:2])} ...`, not a bench: give the --out DIR "
            f"of {BENCH_RUN}"
        )
    return real


def calibrate(args: argparse.Namespace) -> int:
    real = read_results(args.bench_dir)
    out = args.out or args.bench_dir.with_name(args.bench_dir.name + "-sim")
    steps_dir = args.step_log or real["config"].get("step_log_dir")
    factors: dict[str, float] | None = None
    if steps_dir is None or str(steps_dir) == "none":
        sim_args = simulate_args(real["command"], args.device_model, out)
        sim_args.step_scale = args.step_scale
        simulate_quietly(sim_args, out)
        sim = json.loads((out / "results.json").read_text())
    else:
        sim, factors = {"summary": {}}, {}
        # each run is simulated on its own steps: compare with that run (the first repeat),
        # not with the average of the repeats; peers and endpoints log no steps
        runs = {n: r[0] for n, r in real["runs"].items() if r and r[0].get("kind") == "policy"}
        real = {**real, "summary": {n: run["summary"] for n, run in runs.items()}}
        for spec in real["summary"]:
            run_name = f"{spec.replace(':', '-')}-1"
            models, traces, factors[spec] = fit_step_logs(
                Path(steps_dir) / run_name,
                args.device_model,
                out / "models" / run_name,
                args.contention_window or None,
            )
            sim_args = simulate_args(real["command"], ",".join(models), out / run_name)
            sim_args.policies = spec
            sim_args.step_scale = args.step_scale
            sim_args.slow_worker = 1.0  # a slow worker's steps are in its own log
            sim_args.announced_model = args.device_model  # what the real workers announced
            sim_args.slowdown_trace = ",".join(traces) or None
            simulate_quietly(sim_args, out)
            result = json.loads((out / run_name / "results.json").read_text())
            sim["summary"][spec] = result["summary"][spec]
    table = compare(real, sim, factors)
    print(table)
    ok, cells = within(real, sim)
    print(f"\n{ok} of {cells} cells within 10%; simulations' reports in {out}/simulate.log")
    if args.doc is not None:
        write_block(args.doc, args.name or args.bench_dir.name, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
