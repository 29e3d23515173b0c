"""The broker's check of a policy's plan (engine/broker/plan_check.py), on a real core's state:
every wrong dispatch is named, a right one passes, and the core drops a wrong one unapplied."""

from __future__ import annotations

import logging

import pytest
from test_core import drain, make_core, ready

from engine import protocol as p
from engine.broker.plan_check import plan_problems
from engine.scheduler.base import Dispatch


def _core():
    core = make_core()
    core.add_worker(b"id1", ready("w1"), 0.0)
    for rid in ("a", "b"):
        msg = p.Submit(request_id=rid, prompt_ids=[1, 2, 3], max_tokens=10)
        core.submit(b"c1", msg, [1, 2, 3], 0.0)
    drain(core)
    return core


def _dispatch(**kw) -> Dispatch:
    base = dict(worker_id="w1", request_ids=("a",), max_steps=4, join=True, padded_len=3,
                predicted_s=0.1, predicted_peak_bytes=1000)  # fmt: skip
    return Dispatch(**{**base, **kw})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"worker_id": "w9"}, "unknown or draining worker w9"),
        ({"predicted_peak_bytes": 10**9}, "above budget"),
        ({"max_steps": 0}, "empty dispatch"),
        ({"request_ids": ()}, "empty dispatch"),
        ({"request_ids": ("zz",)}, "a request is not waiting or is planned twice"),
        ({"renew": True}, "a renewed request is not running there"),
        ({"handoff_ids": ("b",)}, "a handoff for a request that is not in the batch"),
    ],
)
def test_each_wrong_dispatch_is_named(change: dict, problem: str | None) -> None:
    core = _core()
    problems = plan_problems(_dispatch(**change), core.workers, core.requests, core.waiting, set())
    assert problems == [] if problem is None else any(problem in x for x in problems), problems


def test_a_request_planned_twice_in_one_plan_is_refused() -> None:
    core = _core()
    seen = {"a"}
    problems = plan_problems(_dispatch(), core.workers, core.requests, core.waiting, seen)
    assert problems == ["a request is not waiting or is planned twice"]


def test_the_core_drops_a_wrong_dispatch_unapplied(caplog: pytest.LogCaptureFixture) -> None:
    core = _core()
    with caplog.at_level(logging.ERROR):
        assert not core._check(_dispatch(request_ids=("a", "a", "zz")), set())
    assert "invalid dispatch" in caplog.text and set(core.waiting) == {"a", "b"}
    seen: set[str] = set()
    assert core._check(_dispatch(), seen) and seen == {"a"}
