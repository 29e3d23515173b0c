"""make_policy: one registry by name, typed errors that name the setting to change."""

from __future__ import annotations

import pytest

from engine.config import SchedulerConfig
from engine.scheduler.continuous import ContinuousSCLSPolicy
from engine.scheduler.factory import SchedulerConfigError, make_policy
from engine.scheduler.ils import ILSPolicy
from engine.scheduler.scls import SCLSPolicy
from engine.scheduler.sls import SLSPolicy


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("scls", ContinuousSCLSPolicy),
        ("scls:strict", SCLSPolicy),
        ("ils", ILSPolicy),
        ("sls", SLSPolicy),
    ],
)
def test_make_policy_by_name(name: str, cls: type) -> None:
    policy = make_policy(SchedulerConfig(policy=name))  # type: ignore[arg-type]
    assert isinstance(policy, cls)
    assert policy.name == name


def test_settings_reach_the_policy() -> None:
    cfg = SchedulerConfig(slice_len=32, max_batch_size=7, aging_s=3.0, kv_mode="recompute")
    policy = make_policy(cfg)
    assert isinstance(policy, ContinuousSCLSPolicy)
    strict = make_policy(SchedulerConfig(policy="scls:strict", slice_len=32))
    assert isinstance(strict, SCLSPolicy) and strict.slice_len == 32
    assert (policy.slice_len, policy.max_batch_size, policy.aging_s, policy.kv_mode) == (
        32,
        7,
        3.0,
        "recompute",
    )
    ils = make_policy(SchedulerConfig(policy="ils", max_concurrency=5, ils_admission="optimistic"))
    assert isinstance(ils, ILSPolicy)
    assert (ils.max_rows, ils.admission) == (5, "optimistic")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            SchedulerConfig(policy="fifo"),
            "unknown policy 'fifo': choose one of scls, scls:strict, ils, sls",
        ),  # type: ignore[arg-type]
        (SchedulerConfig(slice_len=0), "slice_len must be >= 1"),
        (SchedulerConfig(max_concurrency=0), "max_concurrency must be >= 1"),
        (SchedulerConfig(aging_s=-1.0), "aging_s must be >= 0"),
        (SchedulerConfig(aging_s=float("nan")), "aging_s must be >= 0"),
    ],
)
def test_bad_settings_are_rejected_with_what_to_change(cfg: SchedulerConfig, message: str) -> None:
    with pytest.raises(SchedulerConfigError, match=message):
        make_policy(cfg)


def test_layering_no_zmq_or_torch_in_the_scheduling_core() -> None:
    from layering import ENGINE, imported_modules

    files = [ENGINE / "cost_model.py", ENGINE / "kv_cost.py", ENGINE / "prefix_hash.py"]
    for path in [*files, *sorted((ENGINE / "scheduler").glob("*.py"))]:
        for name in imported_modules(path):
            assert name.split(".")[0] not in {"zmq", "torch"}, f"{path.name} imports {name}"
