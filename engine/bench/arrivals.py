"""Arrival processes: when each benchmark request is sent (open loop), or how many are kept in
flight (closed loop).

SPEC is one of::

    offline               every request at t = 0
    poisson:RATE          exponential gaps, RATE requests/s
    gamma:RATE:BURSTINESS gamma gaps with mean 1/RATE and shape BURSTINESS (as vLLM's
                          --burstiness: 1 is Poisson, below 1 burstier, above 1 more regular)
    trace[:SPEED]         the trace's own timestamps, SPEED times faster (0.5: twice slower)
    closed:CONCURRENCY    a closed loop: CONCURRENCY requests in flight, the next sent when one ends
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.bench.workloads import Workload, WorkloadError, positive_number

KINDS = ("offline", "poisson", "gamma", "trace", "closed")


@dataclass(frozen=True, slots=True)
class ArrivalSpec:
    kind: str
    rate: float | None = None  # requests/s (poisson, gamma)
    burstiness: float = 1.0  # gamma shape
    speed: float = 1.0  # trace time compression
    concurrency: int | None = None  # closed loop

    @property
    def closed_loop(self) -> bool:
        return self.kind == "closed"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("poisson", "gamma"):
            out["rate"] = self.rate
        if self.kind == "gamma":
            out["burstiness"] = self.burstiness
        if self.kind == "trace":
            out["speed"] = self.speed
        if self.kind == "closed":
            out["concurrency"] = self.concurrency
        return out

    def label(self) -> str:
        return ":".join(str(v) for v in self.describe().values())


def _positive(text: str, what: str, spec: str) -> float:
    return positive_number(text, f"arrival {spec!r}: {what}")


def parse_arrival(spec: str) -> ArrivalSpec:
    """Parse an arrival SPEC (see the module docstring)."""
    kind, *params = [p.strip() for p in spec.strip().lower().split(":")]
    wanted = {
        "offline": (0, 0),
        "poisson": (1, 1),
        "gamma": (2, 2),
        "trace": (0, 1),
        "closed": (1, 1),
    }
    if kind not in wanted:
        raise WorkloadError(
            f"unknown arrival {spec!r}: use offline, poisson:RATE, gamma:RATE:BURSTINESS, "
            "trace[:SPEED] or closed:CONCURRENCY"
        )
    low, high = wanted[kind]
    if not low <= len(params) <= high:
        usage = {
            "offline": "offline",
            "poisson": "poisson:RATE (requests/s)",
            "gamma": "gamma:RATE:BURSTINESS",
            "trace": "trace or trace:SPEED",
            "closed": "closed:CONCURRENCY",
        }[kind]
        raise WorkloadError(f"arrival {spec!r}: write {usage}")
    if kind == "poisson":
        return ArrivalSpec(kind, rate=_positive(params[0], "RATE", spec))
    if kind == "gamma":
        return ArrivalSpec(
            kind,
            rate=_positive(params[0], "RATE", spec),
            burstiness=_positive(params[1], "BURSTINESS", spec),
        )
    if kind == "trace":
        return ArrivalSpec(kind, speed=_positive(params[0], "SPEED", spec) if params else 1.0)
    if kind == "closed":
        value = _positive(params[0], "CONCURRENCY", spec)
        if not value.is_integer():
            raise WorkloadError(f"arrival {spec!r}: CONCURRENCY must be a whole number")
        return ArrivalSpec(kind, concurrency=int(value))
    return ArrivalSpec("offline")


def default_arrival(workload: Workload) -> ArrivalSpec:
    """A trace with timestamps is replayed at its own pace; anything else arrives at once."""
    return ArrivalSpec("trace") if workload.has_timestamps else ArrivalSpec("offline")


def send_times(spec: ArrivalSpec, workload: Workload, seed: int) -> list[float] | None:
    """Send offsets in seconds from the start, one per request in order (None: closed loop).
    Random gaps use their own stream of ``seed``; the first request is sent at t = 0."""
    num = len(workload.requests)
    if spec.kind == "closed":
        return None
    if spec.kind == "offline":
        return [0.0] * num
    if spec.kind == "trace":
        if not workload.has_timestamps:
            raise WorkloadError(
                f"arrival 'trace' needs a trace with timestamps; {workload.name} has none: "
                "use offline, poisson:RATE, gamma:RATE:BURSTINESS or closed:N"
            )
        return [float(r.arrival_s) / spec.speed for r in workload.requests]  # type: ignore[arg-type]
    assert spec.rate is not None
    rng = np.random.default_rng([seed, 2])
    if spec.kind == "poisson":
        gaps = rng.exponential(1.0 / spec.rate, size=num)
    else:
        gaps = rng.gamma(spec.burstiness, 1.0 / (spec.rate * spec.burstiness), size=num)
    gaps[0] = 0.0
    return [float(t) for t in np.cumsum(gaps)]
