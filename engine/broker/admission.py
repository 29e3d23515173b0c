"""Admission control: the bound on the broker's queue (accepted, unfinished requests and their
tokens) and the retry-after estimate, from the workers' cost models, of an "overloaded" refusal.
Pure: no sockets, no clocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.cost_model import CostModel

MIN_RETRY_S = 0.05
MAX_RETRY_S = 60.0
NO_WORKER_RETRY_S = 1.0  # nothing to estimate from: about when a starting worker joins


class Overloaded(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class LiveRequest:
    remaining_tokens: int  # tokens it may still generate
    queued_tokens: int  # what it counts against max_tokens: prompt plus max_tokens
    context_len: int


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """``max_requests``: accepted, unfinished requests; ``max_tokens``: their prompt plus
    max_tokens. None: no limit."""

    max_requests: int | None = None
    max_tokens: int | None = None

    def too_big(self, new_tokens: int) -> str | None:
        """Why a request can never be admitted (a message), or None."""
        if self.max_tokens is not None and new_tokens > self.max_tokens:
            return (
                f"request rejected: prompt plus max_tokens is {new_tokens:,} tokens, more than the "
                f"whole queue may hold (--max-queued-tokens {self.max_tokens:,}): ask for fewer "
                "tokens, or raise the limit"
            )
        return None

    def excess(self, num_requests: int, num_tokens: int, new_tokens: int) -> tuple[int, int]:
        """(requests, tokens) that must finish before a request of ``new_tokens`` fits; (0, 0)
        when it fits now."""
        req = 0 if self.max_requests is None else max(0, num_requests + 1 - self.max_requests)
        tok = 0 if self.max_tokens is None else max(0, num_tokens + new_tokens - self.max_tokens)
        return req, tok


def check(
    limits: QueueLimits,
    live: Sequence[LiveRequest],
    num_tokens: int,
    new_tokens: int,
    costs: Sequence[CostModel],
    max_batch_size: int,
) -> None:
    """Raise Overloaded (with a retry-after estimate) if a request of ``new_tokens`` must wait."""
    free_requests, free_tokens = limits.excess(len(live), num_tokens, new_tokens)
    if not free_requests and not free_tokens:
        return
    retry_s = retry_after_s(costs, live, free_requests, free_tokens, max_batch_size)
    what = (
        f"{len(live):,} request{'s' * (len(live) != 1)} in flight "
        f"(--max-queued-requests {limits.max_requests:,})"
        if free_requests
        else f"{num_tokens:,} tokens in flight (--max-queued-tokens {limits.max_tokens:,})"
    )
    raise Overloaded(
        f"engine overloaded: {what}; accepted requests are unaffected. Retry in about "
        f"{retry_s:.2f} s, or add workers",
        retry_s,
    )


def retry_after_s(
    costs: Sequence[CostModel],
    live: Sequence[LiveRequest],
    free_requests: int,
    free_tokens: int,
    max_batch_size: int,
) -> float:
    """Seconds until enough live requests finish, if the workers decode them in batches of
    their fair share at the time model's rate and every request progresses at an equal pace
    (the requests with the fewest remaining tokens finish first)."""
    if not costs or not live:
        return NO_WORKER_RETRY_S
    rows = max(1, min(max_batch_size, math.ceil(len(live) / len(costs))))
    context = max(1, round(sum(r.context_len for r in live) / len(live)))
    rate = sum(rows / max(c.time.decode_step_s(rows, context), 1e-6) for c in costs)
    order = sorted(live, key=lambda r: r.remaining_tokens)
    tokens = order[min(free_requests, len(order)) - 1].remaining_tokens if free_requests else 0
    freed = 0
    for req in order if free_tokens else ():
        freed += req.queued_tokens
        if freed >= free_tokens:
            tokens = max(tokens, req.remaining_tokens)
            break
    seconds = tokens * len(live) / rate  # each request gets 1/len(live) of the rate
    return min(MAX_RETRY_S, max(MIN_RETRY_S, seconds))
