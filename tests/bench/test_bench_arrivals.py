"""Arrival processes: spec parsing, seeded schedules, rates and burstiness."""

from __future__ import annotations

import numpy as np
import pytest

from engine.bench.arrivals import ArrivalSpec, default_arrival, parse_arrival, send_times
from engine.bench.workloads import RequestSpec, Workload, WorkloadError


def _workload(num, arrivals=None):
    reqs = tuple(
        RequestSpec(i, 10, 5, None if arrivals is None else arrivals[i]) for i in range(num)
    )
    return Workload("test", "synthetic" if arrivals is None else "azure", reqs)


def test_parse():
    assert parse_arrival("offline") == ArrivalSpec("offline")
    assert parse_arrival("poisson:4") == ArrivalSpec("poisson", rate=4.0)
    assert parse_arrival("gamma:2:0.5") == ArrivalSpec("gamma", rate=2.0, burstiness=0.5)
    assert parse_arrival("trace") == ArrivalSpec("trace", speed=1.0)
    assert parse_arrival("trace:0.5") == ArrivalSpec("trace", speed=0.5)
    spec = parse_arrival("closed:8")
    assert spec.closed_loop and spec.concurrency == 8
    assert spec.describe() == {"kind": "closed", "concurrency": 8}
    for bad, needle in [
        ("burst:3", "unknown arrival"),
        ("poisson", "write poisson:RATE"),
        ("gamma:2", "write gamma:RATE:BURSTINESS"),
        ("poisson:-1", "positive"),
        ("closed:2.5", "whole number"),
        ("trace:x", "expected a number"),
    ]:
        with pytest.raises(WorkloadError, match=needle):
            parse_arrival(bad)


def test_offline_closed_and_trace():
    assert send_times(ArrivalSpec("offline"), _workload(3), 0) == [0.0, 0.0, 0.0]
    assert send_times(ArrivalSpec("closed", concurrency=2), _workload(3), 0) is None
    trace = _workload(3, [0.0, 1.0, 4.0])
    assert send_times(ArrivalSpec("trace", speed=2.0), trace, 0) == [0.0, 0.5, 2.0]
    assert default_arrival(trace).kind == "trace"
    assert default_arrival(_workload(3)).kind == "offline"
    with pytest.raises(WorkloadError, match="needs a trace with timestamps"):
        send_times(ArrivalSpec("trace"), _workload(3), 0)


def test_poisson_rate_and_seed():
    times = send_times(ArrivalSpec("poisson", rate=4.0), _workload(4000), seed=3)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.06)
    assert send_times(ArrivalSpec("poisson", rate=4.0), _workload(4000), seed=3) == times
    assert send_times(ArrivalSpec("poisson", rate=4.0), _workload(4000), seed=4) != times


def test_gamma_burstiness():
    low = np.diff(send_times(ArrivalSpec("gamma", 2.0, burstiness=0.25), _workload(4000), 0))
    high = np.diff(send_times(ArrivalSpec("gamma", 2.0, burstiness=4.0), _workload(4000), 0))
    assert low.mean() == pytest.approx(0.5, rel=0.1) and high.mean() == pytest.approx(0.5, rel=0.1)
    assert low.std() / low.mean() == pytest.approx(2.0, rel=0.15)  # CV = 1 / sqrt(shape)
    assert high.std() / high.mean() == pytest.approx(0.5, rel=0.15)
