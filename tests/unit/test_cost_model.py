"""Time model fit and refinement, closed forms, serialisation; memory model bounds."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cost_model import (
    CostModel,
    CostModelError,
    MemoryModel,
    TimeModel,
)
from engine.nnls import _nnls_every_support, nnls
from engine.protocol import TimeModelParams

from .brute import brute_running_peak

TRUE_PREFILL = (1.5e-4, 2.0e-3, 3.0e-6, 8.0e-3, 2.0e-8)
TRUE_DECODE = (4.0e-7, 1.2e-3, 2.0e-6, 1.5e-2)
SHAPES = [(n, length) for n in (1, 2, 4, 8, 16, 32) for length in (8, 32, 128, 512, 1024)]


def samples(model: TimeModel, noise: float = 0.0, seed: int = 0, shapes=SHAPES):
    rng = random.Random(seed)
    jitter = lambda: 1 + rng.uniform(-noise, noise)  # noqa: E731
    pre = [(n, length, model.prefill_s(n, length) * jitter()) for n, length in shapes]
    dec = [(n, c, model.decode_step_s(n, c) * jitter()) for n, c in shapes]
    return pre, dec


def test_fit_recovers_known_coefficients_exactly_without_noise() -> None:
    truth = TimeModel(TRUE_PREFILL, TRUE_DECODE)
    fitted = TimeModel.fit(*samples(truth))
    assert fitted.prefill == pytest.approx(TRUE_PREFILL, rel=1e-6)
    assert fitted.decode == pytest.approx(TRUE_DECODE, rel=1e-6)


def test_fit_with_noise_predicts_held_out_shapes_well() -> None:
    truth = TimeModel(TRUE_PREFILL, TRUE_DECODE)
    fitted = TimeModel.fit(*samples(truth, noise=0.05, seed=1))
    held_out = [(n, length) for n in (3, 12, 24) for length in (64, 300, 800)]
    pre, dec = samples(truth, shapes=held_out)
    assert fitted.mape(pre, dec) < 0.03
    # The dominant terms come back within a few percent.
    assert fitted.prefill[0] == pytest.approx(TRUE_PREFILL[0], rel=0.1)
    assert fitted.decode[1] == pytest.approx(TRUE_DECODE[1], rel=0.1)
    assert fitted.decode[3] == pytest.approx(TRUE_DECODE[3], rel=0.1)


def test_fit_keeps_coefficients_non_negative() -> None:
    truth = TimeModel((2e-4, 0, 0, 1e-2, 0), (0, 1e-3, 0, 2e-2))
    fitted = TimeModel.fit(*samples(truth, noise=0.1, seed=2))
    assert min(fitted.prefill + fitted.decode) >= 0


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_nnls_satisfies_the_optimality_conditions(data: st.DataObject) -> None:
    rows, cols = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 5))
    value = st.integers(-3000, 3000).map(lambda v: v / 1000)  # no denormal-scale columns
    a = np.asarray(data.draw(st.lists(value, min_size=rows * cols, max_size=rows * cols)))
    b = np.asarray(data.draw(st.lists(value, min_size=rows, max_size=rows)))
    x = nnls(a.reshape(rows, cols), b)
    grad = a.reshape(rows, cols).T @ (a.reshape(rows, cols) @ x - b)
    assert np.all(x >= 0)
    assert np.all(grad >= -1e-6)  # no descent direction into the feasible set
    assert np.all(np.abs(grad[x > 1e-9]) <= 1e-6)  # stationary on the support


def test_fit_needs_enough_shapes() -> None:
    with pytest.raises(CostModelError, match="distinct"):
        TimeModel.fit([(1, 8, 0.1)] * 10, [(1, 8, 0.1)] * 10)


def test_fit_rejects_bad_samples() -> None:
    pre, dec = samples(TimeModel.default())
    with pytest.raises(CostModelError, match="seconds > 0"):
        TimeModel.fit([*pre, (1, 8, 0.0)], dec)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(0, 2000), st.integers(0, 200), st.integers(0, 64), st.data())
def test_slice_closed_form_matches_the_sum(n, padded, steps, prefill_rows, data) -> None:
    model = TimeModel(TRUE_PREFILL, TRUE_DECODE)
    explicit = model.prefill_s(prefill_rows, padded) + sum(
        model.decode_step_s(n, padded + j) for j in range(1, steps + 1)
    )
    assert model.slice_s(n, padded, steps, prefill_rows) == pytest.approx(explicit, rel=1e-9)
    # Ragged budgets: at step j only rows whose budget is at least j still run.
    budgets = data.draw(st.lists(st.integers(1, max(steps, 1)), min_size=n, max_size=n))
    longest = max(budgets)
    ragged = model.prefill_s(prefill_rows, padded) + sum(
        model.decode_step_s(sum(1 for m in budgets if m >= j), padded + j)
        for j in range(1, longest + 1)
    )
    got = model.slice_s(n, padded, longest, prefill_rows, step_lens=budgets)
    assert got == pytest.approx(ragged, rel=1e-9)


def test_observe_follows_a_slower_device() -> None:
    """Fitted on one device, then fed measurements of a 2x slower decode: predictions in the
    operating region move to the new figures."""
    model = TimeModel.fit(*samples(TimeModel(TRUE_PREFILL, TRUE_DECODE)))
    slower = TimeModel(TRUE_PREFILL, tuple(2 * d for d in TRUE_DECODE))
    region = [(n, c) for n in (8, 16, 24) for c in (200, 300, 400)]
    _, measured = samples(slower, noise=0.02, shapes=region * 30)
    before = model.mape(decode_samples=measured)
    for i in range(0, len(measured), 16):
        model.observe([], measured[i : i + 16])
    assert before > 0.4
    assert model.mape(decode_samples=measured) < 0.03


def test_mixed_steps_teach_what_a_prefill_inside_a_step_costs() -> None:
    """Steps that prefill joining rows inside the decode forward: what they add beyond the
    decode step is learnt as prefill (the per-row terms that price a recompute)."""
    truth = TimeModel(TRUE_PREFILL, TRUE_DECODE)
    model = TimeModel(tuple(3 * p for p in TRUE_PREFILL), TRUE_DECODE)  # prefill 3x too slow
    mixed = [
        (n, c, p, ln, truth.decode_step_s(n, c) + truth.prefill_s(p, ln))
        for n in (4, 12) for c in (100, 300) for p in (1, 2) for ln in (30, 120, 400)
    ] * 12  # fmt: skip
    before = abs(model.row_prefill_s(200) / truth.row_prefill_s(200) - 1)
    for i in range(0, len(mixed), 16):
        model.observe([], [], mixed[i : i + 16])
    assert before > 1.0
    assert abs(model.row_prefill_s(200) / truth.row_prefill_s(200) - 1) < 0.15


def test_samples_observed_without_a_refit_count_at_the_next_one() -> None:
    """``observe(refit=False)`` only keeps samples; ``refit`` then fits on all of them, as one
    observe of them all would have."""
    slower = TimeModel(TRUE_PREFILL, tuple(2 * d for d in TRUE_DECODE))
    _, measured = samples(slower, noise=0.02, shapes=[(8, 200), (16, 300), (24, 400)] * 8)
    paced, eager = TimeModel(TRUE_PREFILL, TRUE_DECODE), TimeModel(TRUE_PREFILL, TRUE_DECODE)
    for i in range(0, len(measured), 8):
        paced.observe([], measured[i : i + 8], refit=False)
    assert paced.decode == TRUE_DECODE  # nothing refitted yet
    paced.refit()
    eager.observe([], measured)
    assert paced.decode == eager.decode != TRUE_DECODE
    paced.refit()  # nothing new: nothing changes
    assert paced.decode == eager.decode


def test_observe_skips_invalid_measurements(caplog: pytest.LogCaptureFixture) -> None:
    model = TimeModel.default()
    with caplog.at_level(logging.DEBUG, logger="engine.cost_model"):
        model.observe([(4, 64, 0.0)], [(0, 64, 0.01)])
    assert model.prefill == TimeModel.default().prefill
    assert "skipped" in caplog.text


def test_mape() -> None:
    model = TimeModel.default()
    exact = [(4, 100, model.decode_step_s(4, 100))]
    off = [(4, 100, model.decode_step_s(4, 100) / 1.1)]
    assert model.mape(decode_samples=exact) == pytest.approx(0.0)
    assert model.mape(decode_samples=off) == pytest.approx(0.1)
    with pytest.raises(CostModelError, match="at least one"):
        model.mape()


def test_params_round_trip_and_four_term_prefill() -> None:
    model = TimeModel(TRUE_PREFILL, TRUE_DECODE)
    again = TimeModel.from_params(model.to_params())
    assert (again.prefill, again.decode) == (model.prefill, model.decode)
    legacy = TimeModel.from_params(TimeModelParams(prefill=[1e-3, 0, 0, 1e-2], decode=[0, 0, 0, 1]))
    assert legacy.prefill == (1e-3, 0, 0, 1e-2, 0)
    with pytest.raises(CostModelError, match="decode coefficients"):
        TimeModel.from_params(TimeModelParams(prefill=[0] * 5, decode=[1, 2]))
    with pytest.raises(CostModelError, match=">= 0"):
        TimeModel((-1, 0, 0, 0, 0), (0, 0, 0, 1))


def test_json_cache_round_trip(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    model = TimeModel.fit(*samples(TimeModel(TRUE_PREFILL, TRUE_DECODE)))
    path = tmp_path / "cache" / "smollm2-cpu-float32.json"
    model.save(path)
    loaded = TimeModel.load_cached(path)
    assert loaded is not None
    assert (loaded.prefill, loaded.decode) == (model.prefill, model.decode)
    assert loaded.to_json() == model.to_json()
    assert TimeModel.load_cached(tmp_path / "missing.json") is None
    path.write_text("{not json")
    assert TimeModel.load_cached(path) is None
    path.write_text(json.dumps({"format": "other", "version": 1}))
    with caplog.at_level(logging.WARNING):
        assert TimeModel.load_cached(path) is None
    assert "re-profile" in caplog.text


def test_memory_model_formula_and_limits() -> None:
    mem = MemoryModel(kv_bytes_per_token=1000, budget_bytes=1_000_000, slack_tokens=10)
    assert mem.batch_peak_bytes(4, 100, 50) == 4 * 160 * 1000
    assert mem.capacity_tokens == 1000
    assert mem.max_rows(100, 50) == 6  # 6 * 160 = 960 <= 1000 < 7 * 160
    assert mem.fits(6, 100, 50) and not mem.fits(7, 100, 50)
    assert mem.max_request_tokens() == 990
    with pytest.raises(CostModelError, match="kv-budget"):
        MemoryModel(kv_bytes_per_token=0, budget_bytes=1)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.integers(1, 200)), max_size=8),
    st.lists(st.tuples(st.integers(1, 300), st.integers(1, 200)), max_size=4),
    st.integers(0, 32),
)
def test_running_peak_matches_brute_force(running, joining, slack) -> None:
    mem = MemoryModel(kv_bytes_per_token=3, budget_bytes=10**9, slack_tokens=slack)
    assert mem.join_peak_bytes(running, joining) == brute_running_peak(mem, running + joining)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 10**6), st.integers(0, 4000), st.integers(0, 500))
def test_max_rows_is_the_largest_that_fits(kv, budget, padded, steps) -> None:
    mem = MemoryModel(kv, budget)
    rows = mem.max_rows(padded, steps)
    assert rows == 0 or mem.fits(rows, padded, steps)
    assert not mem.fits(rows + 1, padded, steps)


def test_cost_model_from_ready() -> None:
    default = CostModel.from_ready(None, 46_080, 2 * 1024**3)
    assert default.time.decode == TimeModel.default().decode
    assert default.memory.capacity_tokens == 2 * 1024**3 // 46_080
    params = TimeModelParams(prefill=list(TRUE_PREFILL), decode=list(TRUE_DECODE))
    assert CostModel.from_ready(params, 1, 100).time.prefill == TRUE_PREFILL


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_nnls_finds_the_support_every_support_search_finds(data: st.DataObject) -> None:
    """The active set lands on the optimum the exhaustive search over supports finds (the
    same least-squares solve on the same support), so refits did not change by getting faster."""
    rows, cols = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 5))
    value = st.integers(-3000, 3000).map(lambda v: v / 1000)
    a = np.asarray(data.draw(st.lists(value, min_size=rows * cols, max_size=rows * cols)))
    a = a.reshape(rows, cols)
    b = np.asarray(data.draw(st.lists(value, min_size=rows, max_size=rows)))
    fast, exhaustive = nnls(a, b), _nnls_every_support(a, b)
    res_fast, res_exhaustive = b - a @ fast, b - a @ exhaustive
    assert float(res_fast @ res_fast) <= float(res_exhaustive @ res_exhaustive) + 1e-9
