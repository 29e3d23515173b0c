"""The DP batcher against brute force over every contiguous partition of small inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cost_model import MemoryModel, TimeModel
from engine.scheduler.batcher import BatcherError, Rows, Span, partition, unit_starts

from .strategies import time_models


@st.composite
def row_sets(draw: st.DrawFn, max_rows: int = 7) -> Rows:
    num = draw(st.integers(1, max_rows))
    ctx = sorted(draw(st.lists(st.integers(1, 300), min_size=num, max_size=num)))
    steps = draw(st.lists(st.integers(1, 64), min_size=num, max_size=num))
    prefill = draw(st.lists(st.booleans(), min_size=num, max_size=num))
    return Rows(np.asarray(ctx), np.asarray(steps), np.asarray(prefill, dtype=bool))


@st.composite
def memories(draw: st.DrawFn, rows: Rows) -> list[MemoryModel]:
    """One or two memory models in which every row fits alone."""
    need = int(max(rows.context_lens + rows.step_lens))
    out = []
    for _ in range(draw(st.integers(1, 2))):
        kv, slack = draw(st.integers(1, 8)), draw(st.integers(0, 32))
        out.append(MemoryModel(kv, draw(st.integers(need + slack, 8 * (need + slack))) * kv, slack))
    return out


def batch_cost(rows: Rows, lo: int, hi: int, time: TimeModel) -> float:
    steps = [int(s) for s in rows.step_lens[lo:hi]]
    padded = int(rows.context_lens[lo:hi].max())
    prefill = int(rows.needs_prefill[lo:hi].sum())
    return time.slice_s(hi - lo, padded, max(steps), prefill, step_lens=steps)


def batch_fits(rows: Rows, lo: int, hi: int, mems: list[MemoryModel], max_rows: int) -> bool:
    padded = int(rows.context_lens[lo:hi].max())
    steps = int(rows.step_lens[lo:hi].max())
    return hi - lo <= max_rows and all(m.fits(hi - lo, padded, steps) for m in mems)


def brute_force(rows: Rows, time: TimeModel, mems: list[MemoryModel], max_rows: int) -> float:
    """Least total time over all 2^(n-1) contiguous partitions that fit."""
    num, best = len(rows), math.inf
    for cuts in itertools.product([False, True], repeat=num - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [num]
        spans = list(itertools.pairwise(bounds))
        if all(batch_fits(rows, lo, hi, mems, max_rows) for lo, hi in spans):
            best = min(best, sum(batch_cost(rows, lo, hi, time) for lo, hi in spans))
    return best


def check_spans(rows: Rows, spans: list[Span], mems: list[MemoryModel], max_rows: int) -> None:
    assert [s.start for s in spans] == [0] + [s.end for s in spans[:-1]]
    assert spans[-1].end == len(rows)
    for s in spans:
        assert batch_fits(rows, s.start, s.end, mems, max_rows)
        assert s.padded_len == rows.context_lens[s.start : s.end].max()
        assert s.steps == rows.step_lens[s.start : s.end].max()
        assert s.num_tokens == rows.step_lens[s.start : s.end].sum()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_dp_matches_brute_force(data: st.DataObject) -> None:
    rows = data.draw(row_sets())
    mems = data.draw(memories(rows))
    time = data.draw(time_models())
    max_rows = data.draw(st.integers(1, 8))
    spans = partition(rows, time, mems, max_rows)
    check_spans(rows, spans, mems, max_rows)
    total = sum(s.predicted_s for s in spans)
    assert total == pytest.approx(sum(batch_cost(rows, s.start, s.end, time) for s in spans))
    assert total == pytest.approx(brute_force(rows, time, mems, max_rows), rel=1e-9, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_coarse_units_give_a_feasible_partition_no_better_than_exact(data: st.DataObject) -> None:
    rows = data.draw(row_sets(max_rows=60))
    mems = data.draw(memories(rows))
    time = data.draw(time_models())
    max_rows = data.draw(st.integers(1, 64))
    per_batch = data.draw(st.integers(1, 8))
    coarse = partition(rows, time, mems, max_rows, per_batch)
    check_spans(rows, coarse, mems, max_rows)
    starts = set(unit_starts(rows, mems, max_rows, per_batch).tolist())
    assert {s.start for s in coarse} <= starts
    exact = sum(s.predicted_s for s in partition(rows, time, mems, max_rows))
    assert sum(s.predicted_s for s in coarse) >= exact * (1 - 1e-9)


def test_padding_against_parallelism() -> None:
    """Similar lengths share a batch; a far longer one is not padded against (decode-bound
    model with a large fixed cost per step)."""
    time = TimeModel((0.0, 0.0, 0.0, 0.0, 0.0), (1e-4, 0.0, 0.0, 0.05))
    rows = Rows(np.asarray([100, 101, 102, 5000]), np.asarray([8, 8, 8, 8]), np.ones(4, bool))
    spans = partition(rows, time, [MemoryModel(1, 10**9, 0)], 16)
    assert [(s.start, s.end) for s in spans] == [(0, 3), (3, 4)]


def test_memory_splits_batches() -> None:
    rows = Rows(np.full(6, 10), np.full(6, 10), np.ones(6, bool))
    spans = partition(rows, TimeModel.default(), [MemoryModel(1, 3 * 20, 0)], 16)
    assert [s.num_rows for s in spans] == [3, 3]


def test_a_row_that_fits_nowhere_is_an_error() -> None:
    rows = Rows(np.asarray([10, 500]), np.asarray([4, 4]), np.ones(2, bool))
    with pytest.raises(BatcherError, match="fit"):
        partition(rows, TimeModel.default(), [MemoryModel(1, 100, 0)], 4)


def test_rows_must_be_sorted() -> None:
    with pytest.raises(BatcherError, match="sorted"):
        Rows(np.asarray([5, 3]), np.asarray([1, 1]), np.ones(2, bool))
