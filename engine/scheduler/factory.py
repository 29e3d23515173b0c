"""Builds the configured policy by name: one registry, no policy ``if`` anywhere else."""

from __future__ import annotations

from collections.abc import Callable

from engine.config import SchedulerConfig
from engine.scheduler.base import Policy
from engine.scheduler.continuous import ContinuousSCLSPolicy
from engine.scheduler.ils import ILSPolicy
from engine.scheduler.scls import SCLSPolicy
from engine.scheduler.sls import SLSPolicy

POLICIES: dict[str, Callable[[SchedulerConfig], Policy]] = {
    "scls": ContinuousSCLSPolicy.from_config,
    "scls:strict": SCLSPolicy.from_config,
    "ils": ILSPolicy.from_config,
    "sls": SLSPolicy.from_config,
}


class SchedulerConfigError(ValueError):
    """A scheduler setting is out of range; the message names the flag to change."""


def check_config(cfg: SchedulerConfig) -> None:
    problems = []
    if cfg.policy not in POLICIES:
        problems.append(f"unknown policy {cfg.policy!r}: choose one of {', '.join(POLICIES)}")
    for name in ("slice_len", "max_gen_len", "max_batch_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.max_concurrency is not None and cfg.max_concurrency < 1:
        problems.append(f"max_concurrency must be >= 1 or None (got {cfg.max_concurrency})")
    if not cfg.aging_s >= 0:
        problems.append(f"aging_s must be >= 0 seconds (got {cfg.aging_s})")
    if cfg.kv_mode not in ("auto", "keep", "recompute"):
        problems.append(f"kv_mode must be 'auto', 'keep' or 'recompute' (got {cfg.kv_mode!r})")
    if cfg.ils_admission not in ("reserve", "optimistic"):
        problems.append(
            f"ils_admission must be 'reserve' or 'optimistic' (got {cfg.ils_admission!r})"
        )
    if problems:
        raise SchedulerConfigError("scheduler config: " + "; ".join(problems))


def make_policy(cfg: SchedulerConfig) -> Policy:
    """The policy named by ``cfg.policy``, configured from ``cfg``; raises
    SchedulerConfigError if a setting is out of range."""
    check_config(cfg)
    return POLICIES[cfg.policy](cfg)
