"""How simulation time grows with requests and instances: ``python -m engine.sim.study --out DIR``
runs a grid of simulations (Azure conversation lengths, bursty gamma arrivals at a rate per
instance that loads them) and writes scale.json and scale.png (docs/SIMULATOR.md, "Scale")."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine.bench.arrivals import parse_arrival, send_times
from engine.bench.workloads import LengthScaling, load_workload, scale_workload
from engine.config import SchedulerConfig
from engine.sim.cluster import SimItem, Simulation
from engine.sim.devices import device_model

AZURE = "/work/shared/traces/azure_conv_2023.csv"


def azure_like(num: int, rate: float, trace: str, seed: int, max_context_len: int):
    """``num`` requests with lengths resampled from the Azure conversation trace, arriving as a
    gamma process (burstiness 0.5) at ``rate`` requests/s."""
    spec = f"synthetic:prompt=empirical:azure:{trace},output=empirical:azure:{trace}"
    workload = load_workload(spec, num, seed, 0, None)
    scaling = LengthScaling(max_output_len=1024, max_total_len=max_context_len - 1)
    workload = scale_workload(workload, scaling)
    times = send_times(parse_arrival(f"gamma:{rate}:0.5"), workload, seed)
    items = [SimItem(r.index, r.prompt_len, r.output_len) for r in workload.requests]
    return items, times


def measure(num: int, instances: int, rate_per_instance: float, device: str, trace: str) -> dict:
    dev = device_model(device)
    items, times = azure_like(num, rate_per_instance * instances, trace, 0, dev.max_context_len)
    sim = Simulation(SchedulerConfig(), [dev] * instances, refine=False)
    started = time.perf_counter()
    out = sim.run(items, times)
    wall_s = time.perf_counter() - started
    done = sum(r.success for r in out.records)
    return {
        "requests": num,
        "instances": instances,
        "wall_s": wall_s,
        "simulated_s": out.duration_s,
        "completed": done,
        "request_throughput": done / out.duration_s,
        "output_tokens": sum(r.num_output_tokens for r in out.records),
        "events": out.num_events,
        "broker_rounds": out.num_rounds,
        "broker_cpu_s": out.broker_cpu_s,
    }


def plot(rows: list[dict], path: Path) -> None:
    from engine.bench.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, fixed in ((axes[0], "requests", "instances"), (axes[1], "instances", "requests")):
        groups: dict[int, list[dict]] = {}
        for row in rows:
            groups.setdefault(row[fixed], []).append(row)
        for value, group in sorted(groups.items()):
            if len(group) < 2:
                continue
            group.sort(key=lambda r: r[key])
            xs, ys = [r[key] for r in group], [r["wall_s"] for r in group]
            ax.plot(xs, ys, marker="o", label=f"{fixed} = {value}")
        ax.set_xlabel(key)
        ax.set_ylabel("simulation wall time (s)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("Simulation time (continuous SCLS, H100 + Llama-3-8B, Azure-like load)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.sim.study", description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", default="1000,4000,16000", help="grid at --fixed-instances")
    ap.add_argument("--instances", default="2,8,32,64", help="grid at --fixed-requests")
    ap.add_argument("--fixed-instances", type=int, default=8)
    ap.add_argument("--fixed-requests", type=int, default=8000)
    ap.add_argument("--rate-per-instance", type=float, default=8.0)
    ap.add_argument("--device-model", default="h100-80gb:llama-3-8b")
    ap.add_argument("--trace", default=AZURE)
    ap.add_argument(
        "--replot", action="store_true", help="only redraw OUT/scale.png from OUT/scale.json"
    )
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads((args.out / "scale.json").read_text()), args.out / "scale.png")
        return 0
    grid = {(int(n), args.fixed_instances) for n in args.requests.split(",")}
    grid |= {(args.fixed_requests, int(i)) for i in args.instances.split(",")}
    rows = []
    for num, instances in sorted(grid):
        row = measure(num, instances, args.rate_per_instance, args.device_model, args.trace)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out / "scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
