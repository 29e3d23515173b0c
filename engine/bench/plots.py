"""PNG plots of a results document (matplotlib, Agg backend): throughput per entry, latency
CDFs, per-worker load over time and KV memory against prediction and budget over time.
They read only the JSON document, so ``write_plots(json.load(...), dir)`` redraws old runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MIB = 2**20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _requests(doc: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for run in doc["runs"][name] for r in run["requests"]]


def plot_throughput(doc: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = list(doc["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(names) + 3), 3.6))
    for ax, key, unit in zip(
        axes,
        ("request_throughput", "output_throughput"),
        ("requests/s", "output tokens/s"),
        strict=True,
    ):
        values = [doc["summary"][n].get(key) or 0.0 for n in names]
        bars = ax.bar(names, values, color="tab:blue")
        labels = [f"{v:.3g}" for v in values]
        for i, name in enumerate(names):  # a run cut short: over its cut-off, not comparable
            if not doc["summary"][name].get("complete", True):
                bars[i].set(color="lightgrey", hatch="//", edgecolor="grey")
                labels[i] += "\nincomplete"
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(key)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.step(xs, ys, where="post", label=label)


def plot_latency_cdfs(doc: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in doc["summary"]:
        done = [
            r
            for r in _requests(doc, name)
            if r["finished_s"] is not None and r["submitted_s"] is not None
        ]
        ttft = [
            r["first_token_s"] - r["submitted_s"] for r in done if r["first_token_s"] is not None
        ]
        e2e = [r["finished_s"] - r["submitted_s"] for r in done]
        _cdf(axes[0], ttft, name)
        _cdf(axes[1], e2e, name)
    for ax, title in zip(axes, ("time to first token", "end-to-end latency"), strict=True):
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _policy_runs(doc: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, first repeat) of every entry that has an engine timeline."""
    return [(n, runs[0]) for n, runs in doc["runs"].items() if runs and runs[0].get("timeline")]


def _series(run: Mapping[str, Any], key: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for sample in run["timeline"]:
        for w in sample["workers"]:
            xs, ys = out.setdefault(w["worker_id"], ([], []))
            xs.append(sample["at_s"])
            ys.append(w[key])
    return out


def plot_worker_load(doc: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    runs = _policy_runs(doc)
    if not runs:
        return
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.4 * len(runs)), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs, strict=True):
        for worker_id, (xs, ys) in _series(run, "num_running_requests").items():
            ax.step(xs, ys, where="post", label=worker_id)
        imbalance = doc["summary"][name].get("load_imbalance")
        suffix = f" (imbalance {imbalance:.1%})" if isinstance(imbalance, float) else ""
        ax.set_title(f"{name}: running requests per worker{suffix}", fontsize=9)
        ax.set_ylabel("requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the first request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(doc: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    runs = _policy_runs(doc)
    if not runs:
        return
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.4 * len(runs)), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs, strict=True):
        used = _series(run, "kv_used_bytes")
        predicted = _series(run, "kv_predicted_peak_bytes")
        budget = _series(run, "kv_budget_bytes")
        for i, worker_id in enumerate(used):
            color = f"C{i}"
            xs, ys = used[worker_id]
            ax.plot(xs, np.asarray(ys) / MIB, color=color, label=f"{worker_id} used")
            pxs, pys = predicted[worker_id]
            ax.plot(pxs, np.asarray(pys) / MIB, color=color, ls=":", label=f"{worker_id} predicted")
        if budget:
            bxs, bys = next(iter(budget.values()))
            ax.plot(bxs, np.asarray(bys) / MIB, color="red", ls="--", label="budget")
        ax.set_title(f"{name}: KV cache per worker", fontsize=9)
        ax.set_ylabel("MiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper right", ncol=2)
    axes[-1, 0].set_xlabel("seconds since the first request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {
    "throughput.png": plot_throughput,
    "latency_cdf.png": plot_latency_cdfs,
    "worker_load.png": plot_worker_load,
    "memory.png": plot_memory,
}


def write_plots(doc: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Every plot that has data, written into ``out_dir``; returns their paths."""
    written = []
    for filename, plot in PLOTS.items():
        path = out_dir / filename
        plot(doc, path)
        if path.exists():
            written.append(path)
    return written
