"""Compare SLS, ILS and SCLS on the same workload (a fresh engine each), as `run.py bench` does,
and print SCLS's ratios against SLS.

    .venv/bin/python examples/compare_policies.py [OUT_DIR]

About two minutes on a 2-core laptop with the embedded model; the tables, the JSON document
and the plots land in OUT_DIR (default bench-compare/).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.bench.cli import bench_main

OUT_DIR = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-compare")


def main() -> int:
    code = bench_main([
        "--policies", "sls,ils,scls", "--workers", "2", "--threads", "1",
        "--workload", "synthetic:prompt=uniform:24:56,output=lognormal:60:0.8",
        "--num-requests", "32", "--max-gen-len", "256", "--slice-len", "32",
        "--kv-budget", "64MiB", "--seed", "0", "--out", str(OUT_DIR),
    ])  # fmt: skip
    if code != 0:
        return code
    doc = json.loads((OUT_DIR / "results.json").read_text())
    for name, ratio in doc["ratios"].items():
        print(f"{name:>6}: {ratio['request_throughput']:.2f}x the request throughput of sls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
