"""Per-worker cost model: a time model (prefill and decode seconds, fitted by least squares and
refined online), a memory model (KV bytes of a batch or a running set against a budget) and a
KV move model (restores and handoffs, engine/kv_cost.py).

Units: seconds, tokens, bytes. Pure Python and numpy (no torch, no zmq). The formulas, their
units and where the numbers come from are in docs/SCHEDULING.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.kv_cost import KVMoveModel
from engine.nnls import nnls
from engine.protocol import TimeModelParams

log = logging.getLogger(__name__)

Sample = tuple[int, int, float]  # (rows N, length L or context c, seconds)
FloatArray = npt.NDArray[np.float64]

# T_prefill(N, L) = p0*N*L + p1*N + p2*L + p3 + p4*N*L*L   (the last term: attention, O(L^2))
PREFILL_TERMS = ("n*l", "n", "l", "1", "n*l*l")
# T_decode(N, c) = d0*N*c + d1*N + d2*c + d3
DECODE_TERMS = ("n*c", "n", "c", "1")

_JSON_FORMAT = "scls-time-model"
_JSON_VERSION = 1
_MAX_ANCHORS = 64  # profile samples kept as the prior of online refits
ANCHOR_WEIGHT = 2.0  # how many measured samples the whole prior counts as in a refit
_ANCHOR_GRID = ((1, 4, 16, 64), (16, 128, 512, 2048))  # synthetic anchors: rows x lengths


class CostModelError(ValueError):
    """Bad coefficients, samples or cache contents; the message says what to change."""


def _prefill_features(n: FloatArray, length: FloatArray) -> FloatArray:
    return np.stack([n * length, n, length, np.ones_like(n), n * length * length], axis=1)


def _decode_features(n: FloatArray, context: FloatArray) -> FloatArray:
    return np.stack([n * context, n, context, np.ones_like(n)], axis=1)


class _Window:
    """The most recent samples, at most ``size`` rows of (rows, length, seconds), kept in a
    numpy ring so that a refit reads them without converting Python tuples."""

    __slots__ = ("_rows", "_next", "_full")

    def __init__(self, size: int) -> None:
        self._rows = np.empty((size, 3), dtype=np.float64)
        self._next = 0  # where the next sample goes
        self._full = False

    def extend(self, samples: FloatArray) -> None:
        size = len(self._rows)
        samples = samples[-size:]
        first = min(len(samples), size - self._next)  # up to the end, then from the start
        self._rows[self._next : self._next + first] = samples[:first]
        self._rows[: len(samples) - first] = samples[first:]
        self._full = self._full or self._next + len(samples) >= size
        self._next = (self._next + len(samples)) % size

    def oldest_first(self) -> FloatArray:
        if not self._full:
            return self._rows[: self._next]
        return np.concatenate([self._rows[self._next :], self._rows[: self._next]])


def _bad_samples(arr: FloatArray) -> Any:
    """Per sample (rows, length, seconds): True where it cannot be a measurement."""
    return ~np.isfinite(arr).all(axis=1) | (arr[:, 0] < 1) | (arr[:, 1] < 0) | (arr[:, 2] <= 0)


def _as_samples(samples: Iterable[Sequence[float]], kind: str) -> FloatArray:
    arr = np.asarray([tuple(s) for s in samples], dtype=np.float64).reshape(-1, 3)
    bad = _bad_samples(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise CostModelError(
            f"{kind} sample {i} is {tuple(arr[i])}: rows must be >= 1, lengths >= 0 and "
            "seconds > 0 and finite; drop such measurements before fitting"
        )
    return arr


def _fit_terms(
    arr: FloatArray, features: Any, weights: FloatArray | None = None
) -> tuple[float, ...]:
    """Coefficients minimising the squared *relative* error (each sample weighted by 1/seconds,
    so that small and large batches count alike, times optional per-sample ``weights``),
    non-negative, columns scaled for conditioning."""
    scale_rows = 1.0 / arr[:, 2]
    if weights is not None:
        scale_rows = scale_rows * np.sqrt(weights)
    x = features(arr[:, 0], arr[:, 1]) * scale_rows[:, None]
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    target = arr[:, 2] * scale_rows
    coef = nnls(x / scale, target) / scale
    return tuple(float(c) for c in coef)


def _mean_or_one(values: FloatArray) -> float:
    return float(values.mean()) if len(values) else 1.0


def _check_coefficients(values: Sequence[float], num_terms: int, kind: str) -> tuple[float, ...]:
    coef = tuple(float(v) for v in values)
    if len(coef) != num_terms or not all(math.isfinite(c) and c >= 0 for c in coef):
        raise CostModelError(
            f"{kind} coefficients {list(coef)} are invalid: give {num_terms} finite values >= 0 "
            f"for the terms {PREFILL_TERMS if kind == 'prefill' else DECODE_TERMS}"
        )
    return coef


def _subsample(arr: FloatArray, max_rows: int) -> FloatArray:
    if len(arr) <= max_rows:
        return arr
    picked: FloatArray = arr[np.linspace(0, len(arr) - 1, max_rows).round().astype(int)]
    return picked


class TimeModel:
    """Predicted seconds of prefills, decode steps and whole slices on one worker.

    ``prefill`` and ``decode`` hold the coefficients of PREFILL_TERMS and DECODE_TERMS (seconds
    per unit of each term). ``observe`` refits on a bounded window of measured samples plus the
    anchors (profile samples, or a grid predicted by the initial coefficients) as a prior.
    """

    __slots__ = ("prefill", "decode", "_anchors", "_recent", "_unfitted")

    def __init__(
        self,
        prefill: Sequence[float],
        decode: Sequence[float],
        *,
        anchor_prefill: Sequence[Sample] | None = None,
        anchor_decode: Sequence[Sample] | None = None,
        window_len: int = 256,
    ) -> None:
        self.prefill = _check_coefficients(prefill, len(PREFILL_TERMS), "prefill")
        self.decode = _check_coefficients(decode, len(DECODE_TERMS), "decode")
        grid = [(n, length) for n in _ANCHOR_GRID[0] for length in _ANCHOR_GRID[1]]
        # Without profile samples, the prior of online refits is a grid of predictions.
        if anchor_prefill is None:
            anchor_prefill = [(n, ln, t) for n, ln in grid if (t := self.prefill_s(n, ln)) > 0]
        if anchor_decode is None:
            anchor_decode = [(n, c, t) for n, c in grid if (t := self.decode_step_s(n, c)) > 0]
        self._anchors = (
            _subsample(_as_samples(anchor_prefill, "prefill"), _MAX_ANCHORS),
            _subsample(_as_samples(anchor_decode, "decode"), _MAX_ANCHORS),
        )
        self._recent = (_Window(window_len), _Window(window_len))
        self._unfitted = [False, False]  # prefill, decode: samples observed since the last fit

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def default(cls) -> TimeModel:
        """Rough figures for a ~135M-parameter model in float32 on a few CPU cores (prefill
        ~500 tokens/s, a decode step ~20 ms plus ~2 ms per row); used until a profile exists."""
        return cls(
            prefill=(2.0e-3, 1.0e-3, 0.0, 5.0e-3, 0.0), decode=(2.0e-6, 2.0e-3, 1.0e-6, 2.0e-2)
        )

    @classmethod
    def fit(
        cls, prefill_samples: Iterable[Sequence[float]], decode_samples: Iterable[Sequence[float]]
    ) -> TimeModel:
        """Fit both formulas from profile samples (N, L, seconds) and (N, c, seconds)."""
        pre, dec = _as_samples(prefill_samples, "prefill"), _as_samples(decode_samples, "decode")
        for arr, terms, kind in ((pre, PREFILL_TERMS, "prefill"), (dec, DECODE_TERMS, "decode")):
            if len({(r[0], r[1]) for r in arr.tolist()}) < len(terms):
                raise CostModelError(
                    f"fitting the {kind} time needs samples of at least {len(terms)} distinct "
                    f"(rows, length) shapes, got {len(arr)} samples: profile more batch shapes"
                )
        model = cls(_fit_terms(pre, _prefill_features), _fit_terms(dec, _decode_features))
        model._anchors = (_subsample(pre, _MAX_ANCHORS), _subsample(dec, _MAX_ANCHORS))
        return model

    @classmethod
    def fit_measured(
        cls,
        prior: TimeModel,
        prefill_samples: Iterable[Sequence[float]],
        decode_samples: Iterable[Sequence[float]],
        mixed_samples: Iterable[Sequence[float]] = (),
        prior_weight: float = 0.05,
    ) -> TimeModel:
        """Every step one worker measured in a run, fitted at once (``observe`` keeps a window
        of the latest): decode steps (n, c, s), prefill steps (p, l, s) and mixed steps (n, c,
        p, l, s), one forward that decoded n rows and prefilled p chunks, timed as
        ``T_decode(n, c) + T_prefill(p, l)`` less the prefill's fixed term (the simulator's
        ProfileTimer). ``prior``'s anchors weigh as ``prior_weight`` samples in all: enough to
        keep a term the run's shapes cannot tell apart at the prior's figure, too little to
        pull a fit of hundreds of steps towards shapes the run never took."""
        dec = np.concatenate([prior._anchors[1], _as_samples(list(decode_samples), "decode")])
        # Least squares on seconds, not relative ones (the weights undo _fit_terms' 1/s): a
        # step slowed by other work counts in full, so the fit's total over the run is the
        # measured total (relative errors fit the typical step, below the mean).
        # The prior's anchors count by relative error, as if each took the run's mean step.
        weights = dec[:, 2] ** 2
        num = len(prior._anchors[1])
        weights[:num] = prior_weight / max(num, 1) * _mean_or_one(dec[num:, 2]) ** 2
        decode = _fit_terms(dec, _decode_features, weights)
        rows = [(float(n), float(ln), float(t), 1.0) for n, ln, t in prior._anchors[0].tolist()]
        num_anchors = len(rows)
        rows += [(float(n), float(ln), float(t), 1.0) for n, ln, t in prefill_samples]
        mixed = np.asarray(list(mixed_samples), dtype=np.float64).reshape(-1, 5)
        # what prefilling inside the forward added: the step less its decode rows' time
        extras = mixed[:, 4] - _decode_features(mixed[:, 0], mixed[:, 1]) @ np.asarray(decode)
        for (_, _, pn, ln, _), extra in zip(mixed.tolist(), extras.tolist(), strict=True):
            if extra > 0 and pn > 0 and ln > 0:
                rows.append((pn, ln, extra, 0.0))
        arr = np.asarray(rows, dtype=np.float64)
        keep = arr[:, 2] > 0
        mask = np.ones((len(arr), len(PREFILL_TERMS)))
        mask[:, 3] = arr[:, 3]  # a mixed step's prefill pays no fixed cost of its own
        weights = arr[:, 2] ** 2
        mean_s = _mean_or_one(arr[num_anchors:, 2][keep[num_anchors:]])
        weights[:num_anchors] = prior_weight / max(num_anchors, 1) * mean_s**2
        arr, mask, weights = arr[keep], mask[keep], weights[keep]

        def features(n: FloatArray, length: FloatArray) -> FloatArray:
            return _prefill_features(n, length) * mask

        model = cls(_fit_terms(arr[:, :3], features, weights), decode)
        model._anchors = prior._anchors
        return model

    @classmethod
    def from_params(cls, params: TimeModelParams) -> TimeModel:
        """From the wire; a 4-term prefill (no attention term) is accepted and padded with 0."""
        prefill = list(params.prefill)
        if len(prefill) == len(PREFILL_TERMS) - 1:
            prefill.append(0.0)
        return cls(prefill, params.decode)

    def to_params(self) -> TimeModelParams:
        return TimeModelParams(prefill=list(self.prefill), decode=list(self.decode))

    # -- prediction -----------------------------------------------------------------------

    def prefill_s(self, n: int, padded_len: int) -> float:
        """Seconds to prefill ``n`` rows left-padded to ``padded_len`` tokens (0 if n == 0)."""
        if n <= 0:
            return 0.0
        p = self.prefill
        return (
            p[0] * n * padded_len + p[1] * n + p[2] * padded_len + p[3] + p[4] * n * padded_len**2
        )

    def row_prefill_s(self, context_len: Any) -> Any:
        """What one more row of ``context_len`` tokens adds to a prefill (the per-row terms),
        elementwise on numpy arrays: the cost of recomputing one request's KV."""
        p = self.prefill
        return p[0] * context_len + p[1] + p[4] * context_len * context_len

    def decode_step_s(self, n: int, context_len: int) -> float:
        """Seconds of one decode step of ``n`` rows attending over ``context_len`` columns."""
        d = self.decode
        return d[0] * n * context_len + d[1] * n + d[2] * context_len + d[3]

    def slice_s(
        self,
        n: int,
        padded_len: int,
        steps: int,
        prefill_rows: int | None = None,
        step_lens: Sequence[int] | None = None,
    ) -> float:
        """T_prefill(prefill_rows, padded_len) + sum_{j=1..steps} T_decode(n_j, padded_len + j),
        in closed form. ``prefill_rows`` (default n): rows without reusable KV. ``n_j``: rows
        still running at step j: all ``n`` of them, or, given each row's step budget
        ``step_lens``, those whose budget is at least j (a row leaves when its budget ends)."""
        rows = n if prefill_rows is None else prefill_rows
        if step_lens is None:
            num_tokens, token_steps = n * steps, n * steps * (steps + 1) // 2
        else:
            num_tokens = sum(step_lens)
            token_steps = sum(m * (m + 1) // 2 for m in step_lens)
        return float(self.slice_s_sums(padded_len, steps, rows, num_tokens, token_steps))

    def slice_s_sums(
        self, padded_len: Any, steps: Any, prefill_rows: Any, num_tokens: Any, token_steps: Any
    ) -> Any:
        """``slice_s`` from per-batch sums, elementwise on numpy arrays or on scalars:
        ``num_tokens`` = sum of the rows' step budgets m_i (the row-steps of decoding) and
        ``token_steps`` = sum of m_i * (m_i + 1) / 2 (their growth beyond padded_len)."""
        p, d = self.prefill, self.decode
        length, rows = padded_len, prefill_rows
        prefill = (
            p[0] * rows * length
            + p[1] * rows
            + p[2] * length
            + p[3]
            + p[4] * rows * length * length
        ) * (rows > 0)
        # sum_j n_j * (l + j) = l * num_tokens + token_steps; sum_j (l + j) over the batch steps.
        attended = length * num_tokens + token_steps
        widths = steps * length + steps * (steps + 1) / 2
        return prefill + d[0] * attended + d[1] * num_tokens + d[2] * widths + d[3] * steps

    # -- refinement and checks ------------------------------------------------------------

    def observe(
        self,
        prefill_samples: Iterable[Sequence[float]],
        decode_samples: Iterable[Sequence[float]],
        mixed_samples: Iterable[Sequence[float]] = (),
        *,
        refit: bool = True,
    ) -> None:
        """Refine from measured batches: refit on the anchors plus the recent window (relative
        least squares, non-negative). Invalid samples (e.g. 0 seconds) are skipped with a log.
        A mixed step (decode rows n at context c, plus p prefill rows of length l, s seconds)
        teaches what prefilling inside a step adds: ``s - T_decode(n, c)``, taken as a prefill
        sample (p, l) when positive (that is what a request joining a running set costs). With
        ``refit`` False the samples only join the window, for a later ``refit``."""
        prefill_samples = list(prefill_samples)
        for n, c, p, length, seconds in mixed_samples:
            extra_s = seconds - self.decode_step_s(int(n), int(c))
            if extra_s > 0 and p > 0 and length > 0:
                prefill_samples.append((int(p), int(length), extra_s))
        for idx, (samples, kind) in enumerate(
            ((prefill_samples, "prefill"), (decode_samples, "decode"))
        ):
            arr = np.asarray([tuple(s) for s in samples], dtype=np.float64).reshape(-1, 3)
            bad = _bad_samples(arr)
            for i in np.flatnonzero(bad):
                log.debug("time model: skipped a measurement: %s sample %s", kind, tuple(arr[i]))
            good = arr[~bad]
            good[:, :2] = np.trunc(good[:, :2])  # whole rows and tokens, as the features count
            if len(good):
                self._recent[idx].extend(good)
                self._unfitted[idx] = True
        if refit:
            self.refit()

    def refit(self) -> None:
        """Refit each formula that has samples it was not fitted on."""
        for idx in (0, 1):
            if self._unfitted[idx]:
                self._unfitted[idx] = False
                self._refit(idx)

    def _refit(self, idx: int) -> None:
        """The anchors weigh as ANCHOR_WEIGHT samples in all, each recent sample as one: a
        few measurements only nudge the prior, a full window overrides it where it was taken."""
        anchors = self._anchors[idx]
        arr = np.concatenate([anchors, self._recent[idx].oldest_first()])
        weights = np.ones(len(arr))
        weights[: len(anchors)] = ANCHOR_WEIGHT / max(len(anchors), 1)
        if idx == 0:
            self.prefill = _fit_terms(arr, _prefill_features, weights)
        else:
            self.decode = _fit_terms(arr, _decode_features, weights)

    def mape(
        self,
        prefill_samples: Iterable[Sequence[float]] = (),
        decode_samples: Iterable[Sequence[float]] = (),
    ) -> float:
        """Mean absolute percentage error (0.05 = 5%) over the given held-out samples."""
        errors = [
            abs(self.prefill_s(int(n), int(length)) - s) / s
            for n, length, s in _as_samples(prefill_samples, "prefill").tolist()
        ]
        errors += [
            abs(self.decode_step_s(int(n), int(c)) - s) / s
            for n, c, s in _as_samples(decode_samples, "decode").tolist()
        ]
        if not errors:
            raise CostModelError("mape needs at least one prefill or decode sample")
        return float(sum(errors) / len(errors))

    # -- serialisation (the per model/device/dtype profile cache) -------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _JSON_FORMAT,
            "version": _JSON_VERSION,
            "prefill_terms": list(PREFILL_TERMS),
            "decode_terms": list(DECODE_TERMS),
            "prefill": list(self.prefill),
            "decode": list(self.decode),
            "prefill_samples": self._anchors[0].tolist(),
            "decode_samples": self._anchors[1].tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TimeModel:
        if data.get("format") != _JSON_FORMAT or data.get("version") != _JSON_VERSION:
            raise CostModelError(
                f"not a version-{_JSON_VERSION} {_JSON_FORMAT} file "
                f"(format={data.get('format')!r}, version={data.get('version')!r}): re-profile"
            )
        return cls(
            data["prefill"],
            data["decode"],
            anchor_prefill=data.get("prefill_samples") or None,
            anchor_decode=data.get("decode_samples") or None,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file, then rename); creates the parent folder."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, target)

    @classmethod
    def load_cached(cls, path: str | os.PathLike[str]) -> TimeModel | None:
        """The cached model, or None if there is none or it is unreadable (logged: re-profile)."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "ignoring the time-model cache %s (%s); the worker will re-profile", path, exc
            )
            return None


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """KV bytes of batches on one worker, whose running rows share one left-padded cache.

    A batch of ``n`` rows padded to ``padded_len`` tokens that runs ``steps`` decode steps peaks
    at ``n * (padded_len + steps + slack_tokens) * kv_bytes_per_token``: padding costs memory
    like real tokens. ``slack_tokens`` per row is the transient term: the worker's buffers grow
    by up to 32 spare columns at a time and copy one layer at a time when they grow or merge.
    """

    kv_bytes_per_token: int
    budget_bytes: int
    slack_tokens: int = 32
    block_tokens: int = 0  # tokens per KV block of a paged cache; 0: one left-padded cache

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 1 or self.budget_bytes < 1 or self.slack_tokens < 0:
            raise CostModelError(
                f"memory model needs kv_bytes_per_token >= 1 (got {self.kv_bytes_per_token}), "
                f"budget_bytes >= 1 (got {self.budget_bytes}) and slack_tokens >= 0 "
                f"(got {self.slack_tokens}); check the worker's --kv-budget and model config"
            )

    @property
    def capacity_tokens(self) -> int:
        """Row-tokens (rows x columns, slack included) that fit in the budget."""
        return self.budget_bytes // self.kv_bytes_per_token

    def batch_peak_bytes(self, n: int, padded_len: int, steps: int) -> int:
        return n * (padded_len + steps + self.slack_tokens) * self.kv_bytes_per_token

    def fits(self, n: int, padded_len: int, steps: int) -> bool:
        return self.batch_peak_bytes(n, padded_len, steps) <= self.budget_bytes

    def max_rows(self, padded_len: int, steps: int) -> int:
        """The most rows of this padded length and step budget that fit (0: not even one)."""
        return self.capacity_tokens // (padded_len + steps + self.slack_tokens)

    def max_request_tokens(self) -> int:
        """Longest prompt + max_tokens a request may have to run alone here: the broker should
        reject longer ones, no policy can ever place them."""
        return self.capacity_tokens - self.slack_tokens

    # -- ILS reservations -----------------------------------------------------------------

    def running_peak_bytes(self, cache_len: int, remaining_steps: Iterable[int]) -> int:
        """Honest peak of a running set that admits nobody else: rows share one cache of
        ``cache_len`` columns that grows by one per step; a row leaves after its remaining
        steps. Peak = max over k of k * (cache_len + m_k + slack), m sorted descending."""
        peak = 0
        for k, m in enumerate(sorted(remaining_steps, reverse=True), start=1):
            peak = max(peak, k * (cache_len + m + self.slack_tokens))
        return peak * self.kv_bytes_per_token

    def reservations_peak_bytes(self, rows: Sequence[tuple[int, int]]) -> int:
        """Honest peak of a running set whose rows hold slice reservations, as (context_len,
        steps left): with block_tokens (a paged cache) each row owns its own blocks, so the peak
        is the sum of each row's blocks at its reservation's end; with one left-padded cache it
        is ``running_peak_bytes`` over the widest context."""
        if not rows:
            return 0
        if bt := self.block_tokens:  # reservation_bytes summed in one pass (a round's hot path)
            blocks = sum(-((1 - c - m) // bt) for c, m in rows)  # ceil((c - 1 + m) / bt) each
            return blocks * bt * self.kv_bytes_per_token
        return self.running_peak_bytes(max(c for c, _ in rows), [m for _, m in rows])

    def reservation_bytes(self, context_len: int, steps: int) -> int:
        """Paged cache: the blocks one row holds at the end of ``steps`` more steps (its cache
        covers ``context_len - 1 + steps`` tokens); padded cache: that row alone."""
        if not self.block_tokens:
            return (context_len + steps + self.slack_tokens) * self.kv_bytes_per_token
        num_blocks = -(-(context_len - 1 + steps) // self.block_tokens)
        return num_blocks * self.block_tokens * self.kv_bytes_per_token

    def join_peak_bytes(
        self,
        running: Iterable[tuple[int, int]],
        joining: Iterable[tuple[int, int]],
    ) -> int:
        """Peak after ``joining`` rows enter a running set; rows as (context_len, max_new_tokens).
        The cache is as wide as the longest context (the worker trims all-padding columns)."""
        rows = list(running) + list(joining)
        cache_len = max((c for c, _ in rows), default=0)
        return self.running_peak_bytes(cache_len, (m for _, m in rows))


@dataclass(frozen=True, slots=True)
class CostModel:
    """One worker's calibrated models (the time and KV move models refine themselves in place)."""

    time: TimeModel
    memory: MemoryModel
    kv: KVMoveModel = field(default_factory=KVMoveModel)

    @classmethod
    def from_ready(
        cls,
        time_params: TimeModelParams | None,
        kv_bytes_per_token: int,
        kv_budget_bytes: int,
        kv: KVMoveModel | None = None,
        kv_block_tokens: int = 0,
    ) -> CostModel:
        """From a worker's Ready message; no profile (None) gives TimeModel.default()."""
        time = TimeModel.default() if time_params is None else TimeModel.from_params(time_params)
        memory = MemoryModel(kv_bytes_per_token, kv_budget_bytes, block_tokens=kv_block_tokens)
        return cls(time, memory, kv or KVMoveModel())
