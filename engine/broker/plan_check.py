"""The broker checks every dispatch a policy plans before applying it: a pure function of the
dispatch and the broker's state (no zmq, no torch), so that a policy's mistake is dropped and
logged rather than applied."""

from __future__ import annotations

from collections.abc import Mapping

from engine.broker.requests import Request, RequestState
from engine.broker.workers import WorkerState
from engine.scheduler.base import Dispatch


def runs_on(requests: Mapping[str, Request], request_id: str, worker_id: str) -> bool:
    req = requests.get(request_id)
    return req is not None and req.state is RequestState.RUNNING and req.worker_id == worker_id


def plan_problems(
    d: Dispatch,
    workers: Mapping[str, WorkerState],
    requests: Mapping[str, Request],
    waiting: Mapping[str, Request],
    seen: set[str],
) -> list[str]:
    """What is wrong with ``d`` (empty: nothing): known worker, waiting requests (or, for a
    renewal, requests running there), none planned twice (``seen``: earlier in the plan),
    predicted memory within the worker's budget."""
    worker = workers.get(d.worker_id)
    problems = []
    if worker is None or worker.draining:
        problems.append(f"unknown or draining worker {d.worker_id}")
    elif d.predicted_peak_bytes > worker.kv_budget_bytes:
        problems.append(
            f"predicted peak {d.predicted_peak_bytes} B above budget {worker.kv_budget_bytes} B"
        )
    if d.max_steps < 1 or not d.request_ids:
        problems.append("empty dispatch")
    if d.renew:
        if not all(
            runs_on(requests, rid, d.worker_id) and rid not in seen for rid in d.request_ids
        ):
            problems.append("a renewed request is not running there or is planned twice")
    elif any(rid not in waiting or rid in seen for rid in d.request_ids):
        problems.append("a request is not waiting or is planned twice")
    if not set(d.handoff_ids) <= set(d.request_ids):
        problems.append("a handoff for a request that is not in the batch")
    return problems
