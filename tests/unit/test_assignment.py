"""Max-min assignment of batches to workers against brute force on tiny cases."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.scheduler.assignment import (
    assign_greedy_max_min,
    assign_min_max,
    makespan,
)


def brute_makespan(completion: list[list[float]]) -> float:
    k, m = len(completion), len(completion[0])
    return min(makespan(completion, p) for p in itertools.permutations(range(m), k))


@st.composite
def matrices(draw: st.DrawFn) -> list[list[float]]:
    m = draw(st.integers(1, 5))
    k = draw(st.integers(1, m))
    cell = st.floats(0.0, 100.0) | st.just(float("inf"))
    return [[draw(cell) for _ in range(m)] for _ in range(k)]


def is_injective(assignment: list[int], m: int) -> bool:
    return len(set(assignment)) == len(assignment) and all(0 <= w < m for w in assignment)


@settings(max_examples=400, deadline=None)
@given(matrices())
def test_exact_min_max_matches_brute_force(completion: list[list[float]]) -> None:
    result = assign_min_max(completion)
    assert is_injective(result, len(completion[0]))
    assert makespan(completion, result) == brute_makespan(completion)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_greedy_max_min_is_optimal_when_workers_differ_only_in_free_time(data) -> None:
    m = data.draw(st.integers(1, 5))
    k = data.draw(st.integers(1, m))
    free_at = data.draw(st.lists(st.floats(0, 50), min_size=m, max_size=m))
    duration = data.draw(st.lists(st.floats(0, 50), min_size=k, max_size=k))
    completion = [[free_at[w] + duration[b] for w in range(m)] for b in range(k)]
    result = assign_greedy_max_min(completion)
    assert is_injective(result, m)
    assert makespan(completion, result) == pytest.approx(brute_makespan(completion))


def test_longest_batch_goes_to_the_earliest_worker() -> None:
    completion = [[1 + 5, 3 + 5], [1 + 1, 3 + 1]]  # worker 0 free at 1, worker 1 at 3
    assert assign_min_max(completion) == [0, 1]
    assert assign_greedy_max_min(completion) == [0, 1]


def test_more_batches_than_workers_is_an_error() -> None:
    with pytest.raises(ValueError, match="at most one batch per worker"):
        assign_min_max([[1.0], [2.0]])


def test_many_workers_fall_back_to_greedy() -> None:
    completion = [[float(w + b) for w in range(12)] for b in range(3)]
    result = assign_min_max(completion)
    assert is_injective(result, 12)
    assert makespan(completion, result) == brute_makespan(completion)
