"""Synthetic workloads: prompt and output lengths drawn, with a seed, from compact specs.

SPEC is ``prompt=DIST,output=DIST`` where DIST is one of::

    40                      fixed (also ``fixed:40``)
    uniform:16:64           uniform integers in [16, 64]
    lognormal:250:0.8       lognormal with mean 250 tokens and shape sigma 0.8 (a long tail)
    empirical:azure:PATH    resampled from a trace's column (prompt or output, as named)
    empirical:PATH          resampled from a file of lengths (one per line, or a JSON list)

Example: ``synthetic:prompt=uniform:24:56,output=lognormal:250:0.8``. Prompt and output lengths
use separate random streams, so changing one distribution leaves the other's draws unchanged.

Shared prefixes (optional keys; prompts are then built from ``RequestSpec.segments``)::

    shared=DIST,groups=N    every prompt (or conversation) starts with one of N system prompts,
                            picked at random, whose lengths are drawn from DIST; ``prompt`` is
                            the length of what follows it (groups defaults to 1)
    turns=DIST,conversations=C
                            multi-turn chats: each conversation lasts a number of turns drawn
                            from DIST; a turn's prompt is the conversation so far (its earlier
                            messages and answers, each answer as long as that turn's output)
                            plus a new message of ``prompt`` tokens; C conversations take turns
                            round robin (default 8), a new one starting when one ends

Example: ``synthetic:prompt=64,output=32,shared=512,groups=4`` or
``synthetic:prompt=uniform:20:80,output=48,turns=uniform:2:8,conversations=6``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
        if kind.lower().startswith("sharegpt"):
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


_DIST_KEYS = ("prompt", "output", "shared", "turns")
_COUNT_KEYS = ("groups", "conversations")


@dataclass(frozen=True, slots=True)
class SharingSpec:
    """The optional prefix-sharing keys of a spec (see the module docstring)."""

    shared: LengthDist | None = None
    groups: int = 1
    turns: LengthDist | None = None
    conversations: int = 8

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.shared is not None:
            out |= {"shared_dist": self.shared.describe(), "groups": self.groups}
        if self.turns is not None:
            out |= {"turns_dist": self.turns.describe(), "conversations": self.conversations}
        return out


def parse_spec(spec: str) -> dict[str, LengthDist]:
    """``prompt=DIST,output=DIST`` -> {"prompt": ..., "output": ...} (and the sharing keys'
    distributions, when given; see ``parse_sharing`` for all of them)."""
    return _parse(spec)[0]


def parse_sharing(spec: str) -> SharingSpec:
    dists, counts = _parse(spec)
    return SharingSpec(
        shared=dists.get("shared"),
        groups=counts.get("groups", 1),
        turns=dists.get("turns"),
        conversations=counts.get("conversations", 8),
    )


def _parse(spec: str) -> tuple[dict[str, LengthDist], dict[str, int]]:
    dists: dict[str, LengthDist] = {}
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in (*_DIST_KEYS, *_COUNT_KEYS):
            raise WorkloadError(
                f"synthetic spec {spec!r}: {part!r} is not KEY=VALUE with KEY one of "
                f"{', '.join((*_DIST_KEYS, *_COUNT_KEYS))}; example: synthetic:{_EXAMPLE}"
            )
        if key in dists or key in counts:
            raise WorkloadError(f"synthetic spec {spec!r} gives {key}= twice")
        if key in _COUNT_KEYS:
            number = positive_number(value.strip(), f"{key}= in {spec!r}")
            if not number.is_integer():
                raise WorkloadError(f"{key}= in {spec!r} must be a whole number, got {value}")
            counts[key] = int(number)
        else:
            dists[key] = parse_dist(value.strip(), "prompt" if key != "output" else "output")
    if "groups" in counts and "shared" not in dists:
        raise WorkloadError(f"synthetic spec {spec!r}: groups= needs shared=DIST (their length)")
    if "conversations" in counts and "turns" not in dists:
        raise WorkloadError(f"synthetic spec {spec!r}: conversations= needs turns=DIST")
    missing = [k for k in ("prompt", "output") if k not in dists]
    if missing:
        raise WorkloadError(
            f"synthetic spec {spec!r} lacks {' and '.join(missing)}=: example synthetic:{_EXAMPLE}"
        )
    return dists, counts


@dataclass(slots=True)
class _Conversation:
    segments: list[tuple[int, int]] = field(default_factory=list)
    turns_left: int = 1


def _shared_segments(
    sharing: SharingSpec, num_requests: int, seed: int, ids: Iterator[int]
) -> list[list[tuple[int, int]]]:
    """The first segment of each request (or conversation): its group's system prompt."""
    if sharing.shared is None:
        return [[] for _ in range(num_requests)]
    lens = sharing.shared.draw(np.random.default_rng([seed, 2]), sharing.groups)
    groups = [(next(ids), n) for n in lens]
    picks = np.random.default_rng([seed, 3]).integers(sharing.groups, size=num_requests)
    return [[groups[int(g)]] for g in picks]


def _with_segments(
    sharing: SharingSpec, prompt_lens: list[int], output_lens: list[int], seed: int
) -> list[RequestSpec]:
    """Requests whose prompts are segments: system prompts, conversations so far."""
    ids = itertools.count()
    num = len(prompt_lens)
    starts = _shared_segments(sharing, num, seed, ids)
    if sharing.turns is None:
        out = []
        for i, (p, o) in enumerate(zip(prompt_lens, output_lens, strict=True)):
            segments = (*starts[i], (next(ids), p))
            out.append(RequestSpec(i, sum(n for _, n in segments), o, segments=segments))
        return out
    turn_rng = np.random.default_rng([seed, 4])
    active: list[_Conversation] = []
    out, num_started = [], 0
    while len(out) < num:
        while len(active) < sharing.conversations:
            turns = sharing.turns.draw(turn_rng, 1)[0]
            active.append(_Conversation(list(starts[num_started % num]), turns))
            num_started += 1
        for conv in list(active):
            if len(out) == num:
                break
            i = len(out)
            segments = (*conv.segments, (next(ids), prompt_lens[i]))
            out.append(
                RequestSpec(i, sum(n for _, n in segments), output_lens[i], segments=segments)
            )
            conv.segments = [*segments, (next(ids), output_lens[i])]  # its answer, as long
            conv.turns_left -= 1
            if conv.turns_left <= 0:
                active.remove(conv)
    return out


def generate(
    spec: str, num_requests: int, seed: int, tokenize: Callable[[str], list[int]] | None = None
) -> tuple[list[RequestSpec], dict[str, Any]]:
    """``num_requests`` requests with lengths drawn from ``spec`` (no arrival offsets)."""
    del tokenize  # synthetic prompts are made later from the tokenizer, at the exact length
    if num_requests < 1:
        raise WorkloadError(f"--num-requests must be at least 1, got {num_requests}")
    dists = parse_spec(spec)
    sharing = parse_sharing(spec)
    prompt_lens = dists["prompt"].draw(np.random.default_rng([seed, 0]), num_requests)
    output_lens = dists["output"].draw(np.random.default_rng([seed, 1]), num_requests)
    if sharing.shared is None and sharing.turns is None:
        pairs = enumerate(zip(prompt_lens, output_lens, strict=True))
        requests = [RequestSpec(i, p, o) for i, (p, o) in pairs]
    else:
        requests = _with_segments(sharing, prompt_lens, output_lens, seed)
    description = {
        "spec": spec,
        "seed": seed,
        "num_requests": num_requests,
        "prompt_dist": dists["prompt"].describe(),
        "output_dist": dists["output"].describe(),
        **sharing.describe(),
    }
    return requests, description
