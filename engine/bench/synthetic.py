"""Synthetic workloads: prompt and output lengths drawn, with a seed, from compact specs.

SPEC is ``prompt=DIST,output=DIST`` where DIST is one of::

    40                      fixed (also ``fixed:40``)
    uniform:16:64           uniform integers in [16, 64]
    lognormal:250:0.8       lognormal with mean 250 tokens and shape sigma 0.8 (a long tail)
    empirical:azure:PATH    resampled from a trace's column (prompt or output, as named)
    empirical:PATH          resampled from a file of lengths (one per line, or a JSON list)

Example: ``synthetic:prompt=uniform:24:56,output=lognormal:250:0.8``. Prompt and output lengths
use separate random streams, so changing one distribution leaves the other's draws unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench.workloads import TRACE_KINDS, RequestSpec, WorkloadError, positive_number

_EXAMPLE = "prompt=uniform:24:56,output=lognormal:250:0.8"


@dataclass(frozen=True, slots=True)
class LengthDist:
    """One length distribution; ``draw`` returns ints >= 1."""

    kind: str  # fixed | uniform | lognormal | empirical
    params: tuple[float, ...] = ()
    values: tuple[int, ...] = ()  # empirical samples
    source: str = ""

    def draw(self, rng: np.random.Generator, num: int) -> list[int]:
        if self.kind == "fixed":
            out = np.full(num, self.params[0])
        elif self.kind == "uniform":
            out = rng.integers(int(self.params[0]), int(self.params[1]) + 1, size=num)
        elif self.kind == "lognormal":
            mean, sigma = self.params
            mu = math.log(mean) - sigma * sigma / 2.0  # so that E[X] = mean
            out = np.rint(rng.lognormal(mu, sigma, size=num))
        else:
            out = rng.choice(np.asarray(self.values), size=num, replace=True)
        return [max(1, int(v)) for v in out]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "fixed":
            out["value"] = int(self.params[0])
        elif self.kind == "uniform":
            out["low"], out["high"] = int(self.params[0]), int(self.params[1])
        elif self.kind == "lognormal":
            out["mean"], out["sigma"] = self.params
        else:
            out["source"] = self.source
            out["num_values"] = len(self.values)
        return out


def _number(text: str, what: str, dist: str) -> float:
    return positive_number(text, f"{what} in {dist!r}")


def parse_dist(text: str, column: str) -> LengthDist:
    """Parse one DIST (see the module docstring); ``column`` ("prompt" or "output") picks the
    trace column of an empirical distribution."""
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind == "fixed" or kind.replace(".", "", 1).isdigit():
        value = _number(rest if kind == "fixed" else kind, "the length", text)
        if not value.is_integer():
            raise WorkloadError(f"fixed length {text!r} must be a whole number of tokens")
        return LengthDist("fixed", (value,))
    parts = rest.split(":") if rest else []
    if kind == "uniform":
        if len(parts) != 2:
            raise WorkloadError(f"{text!r}: write uniform:LOW:HIGH, e.g. uniform:16:64")
        low, high = (_number(p, "a bound", text) for p in parts)
        if low > high:
            raise WorkloadError(f"{text!r}: LOW ({low:g}) is above HIGH ({high:g}): swap them")
        return LengthDist("uniform", (math.ceil(low), math.floor(high)))
    if kind == "lognormal":
        if len(parts) != 2:
            raise WorkloadError(f"{text!r}: write lognormal:MEAN:SIGMA, e.g. lognormal:250:0.8")
        return LengthDist(
            "lognormal", (_number(parts[0], "MEAN", text), _number(parts[1], "SIGMA", text))
        )
    if kind == "empirical":
        return _empirical(rest, column)
    raise WorkloadError(
        f"unknown length distribution {text!r}: use N, fixed:N, uniform:LOW:HIGH, "
        "lognormal:MEAN:SIGMA, empirical:KIND:PATH or empirical:PATH"
    )


def _empirical(rest: str, column: str) -> LengthDist:
    from engine.bench import traces

    kind, sep, path = rest.partition(":")
    if sep and kind.lower() in TRACE_KINDS:
        if kind.lower() == "sharegpt":
            raise WorkloadError("empirical:sharegpt needs a tokenizer: use sharegpt:PATH instead")
        rows = traces.parse(kind.lower(), path)
        values = [r.prompt_len if column == "prompt" else r.output_len for r in rows]
        return LengthDist("empirical", values=tuple(values), source=f"{kind}:{path} ({column})")
    file = Path(rest).expanduser()
    if not file.is_file():
        raise WorkloadError(
            f"empirical lengths {rest!r}: no such file; pass empirical:KIND:PATH (a trace) or "
            "empirical:PATH (one length per line, or a JSON list)"
        )
    text = file.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if text.lstrip().startswith("[") else text.split()
        values = [int(v) for v in raw]
    except (ValueError, TypeError):
        raise WorkloadError(f"{file}: expected whole numbers of tokens, one per line") from None
    values = [v for v in values if v > 0]
    if not values:
        raise WorkloadError(f"{file} holds no positive length")
    return LengthDist("empirical", values=tuple(values), source=str(file))


def parse_spec(spec: str) -> dict[str, LengthDist]:
    """``prompt=DIST,output=DIST`` -> {"prompt": ..., "output": ...}."""
    dists: dict[str, LengthDist] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("prompt", "output"):
            raise WorkloadError(
                f"synthetic spec {spec!r}: {part!r} is not prompt=DIST or output=DIST; "
                f"example: synthetic:{_EXAMPLE}"
            )
        if key in dists:
            raise WorkloadError(f"synthetic spec {spec!r} gives {key}= twice")
        dists[key] = parse_dist(value.strip(), key)
    missing = [k for k in ("prompt", "output") if k not in dists]
    if missing:
        raise WorkloadError(
            f"synthetic spec {spec!r} lacks {' and '.join(missing)}=: example synthetic:{_EXAMPLE}"
        )
    return dists


def generate(
    spec: str, num_requests: int, seed: int, tokenize: Callable[[str], list[int]] | None = None
) -> tuple[list[RequestSpec], dict[str, Any]]:
    """``num_requests`` requests with lengths drawn from ``spec`` (no arrival offsets)."""
    del tokenize  # synthetic prompts are made later from the tokenizer, at the exact length
    if num_requests < 1:
        raise WorkloadError(f"--num-requests must be at least 1, got {num_requests}")
    dists = parse_spec(spec)
    prompt_lens = dists["prompt"].draw(np.random.default_rng([seed, 0]), num_requests)
    output_lens = dists["output"].draw(np.random.default_rng([seed, 1]), num_requests)
    requests = [
        RequestSpec(i, p, o) for i, (p, o) in enumerate(zip(prompt_lens, output_lens, strict=True))
    ]
    description = {
        "spec": spec,
        "seed": seed,
        "num_requests": num_requests,
        "prompt_dist": dists["prompt"].describe(),
        "output_dist": dists["output"].describe(),
    }
    return requests, description
