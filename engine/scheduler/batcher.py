"""SCLS batch formation: split requests sorted by context length into contiguous batches by
dynamic programming, minimising the predicted total time under every target's memory bound.

Since each request generates the same tokens in its slice whichever batch it joins, minimising
the summed batch time is minimising the predicted time per generated token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.cost_model import MemoryModel, TimeModel

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


class BatcherError(ValueError):
    """The rows cannot be partitioned (a row fits no batch); filter them first."""


@dataclass(frozen=True, slots=True)
class Rows:
    """Candidate requests, sorted by context length (ascending)."""

    context_lens: IntArray  # [W] tokens each row must attend to (prompt + generated)
    step_lens: IntArray  # [W] decode steps each row may take in its slice: min(S, max_new_tokens)
    needs_prefill: BoolArray  # [W] False where the target already holds the row's KV
    extra_s: FloatArray | None = None  # [W] seconds to bring a row's KV (restore, handoff)

    def __post_init__(self) -> None:
        n = len(self.context_lens)
        lens = [len(self.step_lens), len(self.needs_prefill)]
        lens += [] if self.extra_s is None else [len(self.extra_s)]
        if any(m != n for m in lens):
            raise BatcherError("context_lens, step_lens, needs_prefill, extra_s differ in length")
        if n and (np.any(np.diff(self.context_lens) < 0) or np.any(self.step_lens < 1)):
            raise BatcherError("rows must be sorted by context length and have step_lens >= 1")

    def __len__(self) -> int:
        return len(self.context_lens)


@dataclass(frozen=True, slots=True)
class Span:
    """One batch: rows ``[start, end)`` of the sorted candidates."""

    start: int
    end: int
    padded_len: int  # longest context of the batch
    steps: int  # its step budget: the longest row's step_len
    num_prefill_rows: int
    num_tokens: int  # tokens its rows may generate (sum of step_lens)
    token_steps: int  # sum of m * (m + 1) / 2 over its step_lens (see TimeModel.slice_s_sums)
    predicted_s: float  # the slice, plus the rows' extra_s

    @property
    def num_rows(self) -> int:
        return self.end - self.start


def fits_all(
    memories: Sequence[MemoryModel], n: IntArray, padded: IntArray, steps: IntArray
) -> BoolArray:
    """Elementwise: the batch fits every memory model (exact integer arithmetic)."""
    ok = np.ones(np.broadcast(n, padded, steps).shape, dtype=bool)
    for mem in memories:
        ok &= n * (padded + steps + mem.slack_tokens) <= mem.capacity_tokens
    return ok


def max_rows_alone(memories: Sequence[MemoryModel], padded_len: int, steps: int) -> int:
    return min(mem.max_rows(padded_len, steps) for mem in memories)


def unit_starts(
    rows: Rows, memories: Sequence[MemoryModel], max_rows: int, per_batch: int, min_units: int = 32
) -> IntArray:
    """Where the DP's units begin: about ``1/per_batch`` of the rows that fit in one batch at
    that length (fine where contexts are long and batches small, coarse where they are short),
    but fine enough for ``min_units`` units in all (single rows up to that many), and never more
    rows than fit at the unit's longest context, so every unit fits alone."""
    finest = -(-len(rows) // min_units)  # ceil: rows per unit that still gives min_units units
    steps = int(rows.step_lens.max())
    caps = np.full(len(rows), max_rows, dtype=np.int64)
    for mem in memories:
        caps = np.minimum(
            caps, mem.capacity_tokens // (rows.context_lens + steps + mem.slack_tokens)
        )
    cap_list = np.maximum(caps, 1).tolist()
    starts, i, num = [], 0, len(cap_list)
    while i < num:
        starts.append(i)
        size = max(1, min(cap_list[i] // per_batch, finest))
        i += min(size, cap_list[min(i + size, num) - 1])
    return np.asarray(starts, dtype=np.int64)


def partition(
    rows: Rows,
    time: TimeModel,
    memories: Sequence[MemoryModel],
    max_rows: int,
    units_per_batch: int | None = None,
) -> list[Span]:
    """The contiguous partition of ``rows`` with the least total predicted time, each batch
    within ``max_rows`` and every memory model. None: exact over all contiguous partitions;
    otherwise cuts fall between units of about 1/``units_per_batch`` of a full batch (see
    unit_starts). O(U * K) for U units and at most K units per batch, vectorised except for
    one short numpy step per unit."""
    num = len(rows)
    if num == 0:
        return []
    if units_per_batch is None:
        starts = np.arange(num, dtype=np.int64)
    else:
        starts = unit_starts(rows, memories, max_rows, units_per_batch)
    ends = np.append(starts[1:], num)
    num_units = len(starts)
    cum_prefill = np.concatenate([[0], np.cumsum(rows.needs_prefill, dtype=np.int64)])
    cum_tokens = np.concatenate([[0], np.cumsum(rows.step_lens, dtype=np.int64)])
    tri = rows.step_lens * (rows.step_lens + 1) // 2
    cum_token_steps = np.concatenate([[0], np.cumsum(tri, dtype=np.int64)])
    extra = np.zeros(num) if rows.extra_s is None else rows.extra_s
    cum_extra = np.concatenate([[0.0], np.cumsum(extra, dtype=np.float64)])
    unit_steps = np.maximum.reduceat(rows.step_lens, starts)

    # How many units a batch ending at unit u may span: no more rows than fit at u's padded
    # length with a single step.
    last_ctx = rows.context_lens[ends - 1]
    rows_cap = np.full(num_units, max_rows, dtype=np.int64)
    for mem in memories:
        rows_cap = np.minimum(rows_cap, mem.capacity_tokens // (last_ctx + 1 + mem.slack_tokens))
    first = np.searchsorted(starts, ends - np.maximum(rows_cap, 1), side="left")
    units_cap = np.arange(num_units) - first + 1
    max_k = int(units_cap.max())

    b = np.arange(num_units)[:, None]  # [U, 1] last unit of the batch
    a = b - np.arange(max_k)[None, :]  # [U, K] first unit of the batch
    valid = a >= 0
    a = np.maximum(a, 0)
    n = ends[b] - starts[a]
    padded = rows.context_lens[ends[b] - 1]
    steps = np.maximum.accumulate(unit_steps[a], axis=1)
    first_row, end_row = starts[a], ends[b]
    cost = time.slice_s_sums(
        padded.astype(np.float64),
        steps.astype(np.float64),
        cum_prefill[end_row] - cum_prefill[first_row],
        (cum_tokens[end_row] - cum_tokens[first_row]).astype(np.float64),
        (cum_token_steps[end_row] - cum_token_steps[first_row]).astype(np.float64),
    ) + (cum_extra[end_row] - cum_extra[first_row])
    feasible = valid & (n <= max_rows) & fits_all(memories, n, padded, steps)
    cost = np.where(feasible, cost, np.inf)

    best = np.full(num_units + 1, np.inf)  # best[u]: least time covering units [0, u)
    best[0] = 0.0
    choice = np.zeros(num_units, dtype=np.int64)
    for u, kk in enumerate(units_cap.tolist()):
        cand = best[u + 1 - kk : u + 1][::-1] + cost[u, :kk]  # k units back: best[u - k] + ...
        k = int(cand.argmin())
        best[u + 1] = cand[k]
        choice[u] = k
    if not math.isfinite(best[num_units]):
        raise BatcherError("some rows fit no batch: drop rows that do not fit alone first")

    spans: list[Span] = []
    u = num_units - 1
    while u >= 0:
        k = int(choice[u])
        lo, hi = int(starts[u - k]), int(ends[u])
        spans.append(
            Span(
                start=lo,
                end=hi,
                padded_len=int(padded[u, 0]),
                steps=int(steps[u, k]),
                num_prefill_rows=int(cum_prefill[hi] - cum_prefill[lo]),
                num_tokens=int(cum_tokens[hi] - cum_tokens[lo]),
                token_steps=int(cum_token_steps[hi] - cum_token_steps[lo]),
                predicted_s=float(cost[u, k]),
            )
        )
        u -= k + 1
    spans.reverse()
    return spans


def span_of(rows: Rows, start: int, end: int, time: TimeModel) -> Span:
    """The batch of rows ``[start, end)`` (non-empty), with its predicted time."""
    steps = rows.step_lens[start:end]
    padded_len, max_steps = int(rows.context_lens[end - 1]), int(steps.max())
    num_prefill_rows = int(rows.needs_prefill[start:end].sum())
    num_tokens, token_steps = int(steps.sum()), int((steps * (steps + 1) // 2).sum())
    extra_s = 0.0 if rows.extra_s is None else float(rows.extra_s[start:end].sum())
    slice_s = time.slice_s_sums(padded_len, max_steps, num_prefill_rows, num_tokens, token_steps)
    return Span(
        start, end, padded_len, max_steps, num_prefill_rows, num_tokens, token_steps,
        float(slice_s) + extra_s,
    )  # fmt: skip


def split_to_fill(rows: Rows, spans: list[Span], num_workers: int, time: TimeModel) -> list[Span]:
    """While there are fewer batches than workers, halve the longest one (by predicted time)
    that has two rows or more: two halves on two workers end sooner than the whole on one. A
    part of a batch that fits fits too (fewer rows, no longer, no more steps)."""
    spans = list(spans)
    while len(spans) < num_workers:
        splittable = [s for s in spans if s.num_rows >= 2]
        if not splittable:
            break
        longest = max(splittable, key=lambda s: s.predicted_s)
        mid = (longest.start + longest.end) // 2
        i = spans.index(longest)
        spans[i : i + 1] = [
            span_of(rows, longest.start, mid, time),
            span_of(rows, mid, longest.end, time),
        ]
    return spans
