"""Send a scripted load to a running engine and print vLLM-style metrics.

    .venv/bin/python run.py serve --workers 2 &          # an engine on ports 5555-5557
    .venv/bin/python examples/loadgen.py [tcp://127.0.0.1:5555] [tcp://127.0.0.1:5557]

Lengths come from a synthetic spec, prompts are made from the model's tokenizer to the exact
token count, arrivals are Poisson at 2 requests/s; every request streams and ignores EOS.
"""

from __future__ import annotations

import asyncio
import sys

from engine.bench.arrivals import parse_arrival, send_times
from engine.bench.loadgen import LoadItem, run_load
from engine.bench.metrics import request_metrics
from engine.bench.prompts import PromptMaker
from engine.bench.workloads import load_workload
from engine.models import load_tokenizer

CLIENT_ADDR = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
STATS_ADDR = sys.argv[2] if len(sys.argv) > 2 else "tcp://127.0.0.1:5557"


def main() -> None:
    workload = load_workload("synthetic:prompt=uniform:16:48,output=lognormal:48:0.6", 16, seed=0)
    maker = PromptMaker(load_tokenizer("embedded"), seed=0)
    items = [
        LoadItem(r.index, maker.make(r.index, r.prompt_len), r.output_len)
        for r in workload.requests
    ]
    times = send_times(parse_arrival("poisson:2"), workload, seed=0)
    outcome = asyncio.run(run_load(CLIENT_ADDR, STATS_ADDR, items, times, max_duration_s=300))
    summary = request_metrics(outcome.records, outcome.duration_s, goodput_ms={"ttft": 5000.0})
    for key in ("completed", "request_throughput", "output_throughput", "request_goodput",
                "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p99_e2el_ms"):  # fmt: skip
        value = summary[key]
        print(f"{key:>20}: {value:.3f}" if isinstance(value, float) else f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
