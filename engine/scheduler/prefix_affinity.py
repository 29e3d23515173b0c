"""Prefix-aware placement, shared by the policies so that their comparison stays fair: a
request whose prompt prefix is cached on some workers (``WaitingRequest.cached_tokens``) saves
that prefill there, but the saving may not pile all traffic onto the worker that holds a hot
prefix. As routers that place by prefix do (SGLang's router, llm-d's endpoint picker), a worker
may take a request for its cache only while its load stays within a bound of the least loaded
candidate; beyond it, load alone decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PrefixBalance:
    """A candidate stays eligible while its load is at most ``least * (1 + relative) +
    absolute`` (load: rows running or granted)."""

    relative: float = 0.25
    absolute: int = 2

    def limit(self, least: float) -> float:
        return least * (1 + self.relative) + self.absolute


DEFAULT_PREFIX_BALANCE = PrefixBalance()


def balanced(options: Sequence[T], load: Callable[[T], float], bound: PrefixBalance) -> list[T]:
    """The options whose load is within ``bound`` of the least loaded one."""
    least = min(load(o) for o in options)
    limit = bound.limit(least)
    return [o for o in options if load(o) <= limit]


def most_cached(
    options: Sequence[T],
    load: Callable[[T], float],
    cached: Callable[[T], int],
    bound: PrefixBalance,
) -> T:
    """Among options within the balance bound, the one holding most of the request's prefix;
    ties (a miss everywhere, most often) go to the first in the given order (least loaded
    first)."""
    eligible = balanced(options, load, bound)
    best = max(cached(o) for o in eligible)
    return next(o for o in eligible if cached(o) == best)
