"""Figures of the KV handoff work (docs/BENCHMARKS.md, "KV handoffs"):

- ``python -m engine.bench.kv_figures table DIR [DIR ...]``: from ``run.py bench`` results, per
  entry: recomputed, reused, handed-off and restored tokens, handoff bytes, throughput, latency
  and load imbalance, as a Markdown table.

(A slowed worker, to show whether work migrates away from it: ``run.py bench --slow-worker 2``.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    ("recomputed_tokens", "recomputed tok", "{:,.0f}"),
    ("reused_kv_tokens", "reused tok", "{:,.0f}"),
    ("handoff_tokens", "handed-off tok", "{:,.0f}"),
    ("handoff_mib", "handoff MiB", "{:,.1f}"),
    ("restored_tokens", "restored tok", "{:,.0f}"),
    ("output_throughput", "out tok/s", "{:.1f}"),
    ("mean_ttft_ms", "mean TTFT ms", "{:,.0f}"),
    ("median_e2el_ms", "p50 e2e ms", "{:,.0f}"),
    ("p99_e2el_ms", "p99 e2e ms", "{:,.0f}"),
    ("load_imbalance", "imbalance", "{:.1%}"),
)


def entry_figures(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The summary of one entry plus handoff sums over its runs' batch records (averaged over
    repeats, like the summary)."""
    out = dict(doc["summary"][name])
    runs = doc["runs"][name]
    for key in ("handoff_tokens", "handoff_bytes", "restored_tokens"):
        total = sum(b.get(key, 0) for run in runs for b in run["batches"])
        out[key] = total / max(len(runs), 1)
    out["handoff_mib"] = out["handoff_bytes"] / 2**20
    return out


def table(paths: list[str]) -> str:
    lines = []
    for path in paths:
        doc = json.loads((Path(path) / "results.json").read_text())
        lines += [f"{doc['workload']['name']} ({doc['command']})", ""]
        lines.append("| entry | " + " | ".join(label for _, label, _ in COLUMNS) + " |")
        lines.append("|---|" + "---:|" * len(COLUMNS))
        for name in doc["summary"]:
            fig = entry_figures(doc, name)
            cells = [
                fmt.format(fig[key]) if isinstance(fig.get(key), int | float) else "n/a"
                for key, _, fmt in COLUMNS
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "table":
        print(table(argv[1:]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
