"""Workloads: what each benchmark request asks for (prompt and output lengths, the trace's own
arrival offsets), where they came from, and how lengths were scaled and clipped to fit.

``load_workload("KIND:PATH" | "synthetic:SPEC", ...)`` is the one entry point; trace parsers are
in engine/bench/traces.py, the synthetic length distributions in engine/bench/synthetic.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

TRACE_KINDS = ("azure", "burstgpt", "mooncake", "sharegpt", "sharegpt-chat")

#: Attribution that every published result from a trace must carry (licence terms).
ATTRIBUTIONS = {
    "azure": (
        "Azure LLM inference trace 2023 (conversation), Azure/AzurePublicDataset, CC-BY 4.0; "
        'Patel et al., "Splitwise: Efficient Generative LLM Inference Using Phase Splitting", '
        "ISCA 2024."
    ),
    "burstgpt": (
        'BurstGPT trace (HPMLL/BurstGPT); Wang et al., "BurstGPT: A Real-world Workload '
        'Dataset to Optimize LLM Serving Systems", arXiv 2401.17644.'
    ),
    "mooncake": (
        'Mooncake trace (kvcache-ai/Mooncake); Qin et al., "Mooncake: A KVCache-centric '
        'Disaggregated Architecture for LLM Serving", FAST 2025.'
    ),
    "sharegpt": "ShareGPT conversations (as used by vLLM's serving benchmark).",
    "sharegpt-chat": "ShareGPT conversations (as used by vLLM's serving benchmark), every turn.",
}


class WorkloadError(ValueError):
    """A workload spec or file that cannot be used; the message says what to change."""


def positive_number(text: str, label: str) -> float:
    """``text`` as a positive finite number; WorkloadError naming ``label`` (what was being read)
    otherwise. Shared by the arrival and the synthetic-length parsers."""
    try:
        value = float(text)
    except ValueError:
        raise WorkloadError(f"{label} is {text!r}, expected a number") from None
    if not value > 0 or math.isinf(value):
        raise WorkloadError(f"{label} must be a positive number, got {text}")
    return value


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One benchmark request before prompts are made: lengths in tokens.

    ``arrival_s``: the trace's own offset from its first request (None for synthetic loads).
    ``prompt_ids``: real prompt tokens when the source had text (ShareGPT); cut or extended to
    ``prompt_len`` when prompts are made.
    ``segments``: the prompt as a sequence of (segment id, tokens) where the same id always
    stands for the same tokens (a shorter length: a prefix of them), so that requests share
    prefixes as the source says (Mooncake's hash_ids, a conversation's earlier turns, a shared
    system prompt); None: the prompt shares nothing with other requests.
    """

    index: int
    prompt_len: int
    output_len: int
    arrival_s: float | None = None
    prompt_ids: tuple[int, ...] | None = None
    segments: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests in arrival order, and a JSON-able description of their origin and scaling."""

    name: str
    kind: str  # "synthetic" or one of TRACE_KINDS
    requests: tuple[RequestSpec, ...]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def has_timestamps(self) -> bool:
        return bool(self.requests) and all(r.arrival_s is not None for r in self.requests)

    @property
    def attribution(self) -> str | None:
        return ATTRIBUTIONS.get(self.kind)


#: The flags that set LengthScaling's fields (the shortest prompt is no flag: 1 token).
_FLAGS = {
    "min_prompt_len": "the shortest prompt",
    "min_output_len": "--min-output-len",
    "max_prompt_len": "--max-prompt-len",
    "max_output_len": "--max-output-len",
}


@dataclass(frozen=True, slots=True)
class LengthScaling:
    """Lengths are divided by the divisors, rounded, then clipped to [min, max]; ``None`` max:
    no clip. ``max_total_len`` bounds prompt + output (the model's context): the prompt gives."""

    prompt_divisor: float = 1.0
    output_divisor: float = 1.0
    min_prompt_len: int = 1
    min_output_len: int = 1
    max_prompt_len: int | None = None
    max_output_len: int | None = None
    max_total_len: int | None = None

    def __post_init__(self) -> None:
        if not (self.prompt_divisor > 0 and self.output_divisor > 0):
            raise WorkloadError(
                f"length divisors must be > 0, got prompt {self.prompt_divisor} and output "
                f"{self.output_divisor}: use 1 to keep lengths, 4 to divide them by 4"
            )
        for name in ("min_prompt_len", "min_output_len", "max_prompt_len", "max_output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise WorkloadError(f"{_FLAGS[name]} must be at least 1, got {value}")
        for lo, hi in (("min_prompt_len", "max_prompt_len"), ("min_output_len", "max_output_len")):
            if getattr(self, hi) is not None and getattr(self, hi) < getattr(self, lo):
                raise WorkloadError(
                    f"{_FLAGS[hi]} ({getattr(self, hi)}) is below {_FLAGS[lo]} "
                    f"({getattr(self, lo)}): raise it"
                )

    def apply(self, req: RequestSpec) -> tuple[RequestSpec, bool, bool]:
        """The scaled request, and whether its prompt / output was clipped by a maximum.
        Segments are scaled one by one (so that equal ones stay equal), the prompt with them."""
        segments = req.segments
        if segments is not None:
            segments = tuple((sid, max(1, round(n / self.prompt_divisor))) for sid, n in segments)
            prompt = max(self.min_prompt_len, sum(n for _, n in segments))
        else:
            prompt = max(self.min_prompt_len, round(req.prompt_len / self.prompt_divisor))
        output = max(self.min_output_len, round(req.output_len / self.output_divisor))
        output_clipped = self.max_output_len is not None and output > self.max_output_len
        if output_clipped:
            output = self.max_output_len
        max_prompt = self.max_prompt_len
        if self.max_total_len is not None:
            room = self.max_total_len - output
            if room < self.min_prompt_len:
                raise WorkloadError(
                    f"request {req.index}: {output} output tokens leave no room for a prompt "
                    f"within {self.max_total_len} tokens of context: lower --max-output-len"
                )
            max_prompt = room if max_prompt is None else min(max_prompt, room)
        prompt_clipped = max_prompt is not None and prompt > max_prompt
        if prompt_clipped:
            prompt = max_prompt
        scaled = replace(req, prompt_len=int(prompt), output_len=int(output), segments=segments)
        return scaled, bool(prompt_clipped), bool(output_clipped)

    def describe(self) -> dict[str, Any]:
        return {
            "prompt_divisor": self.prompt_divisor,
            "output_divisor": self.output_divisor,
            "min_prompt_len": self.min_prompt_len,
            "min_output_len": self.min_output_len,
            "max_prompt_len": self.max_prompt_len,
            "max_output_len": self.max_output_len,
            "max_total_len": self.max_total_len,
        }


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """mean, p50, p90, p99, min and max of token lengths (empty: zeros)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def scale_workload(workload: Workload, scaling: LengthScaling) -> Workload:
    """Apply ``scaling`` to every request; the description records the lengths before and
    after and how many requests a maximum clipped."""
    scaled, num_prompt_clipped, num_output_clipped = [], 0, 0
    for req in workload.requests:
        new, prompt_clipped, output_clipped = scaling.apply(req)
        scaled.append(new)
        num_prompt_clipped += prompt_clipped
        num_output_clipped += output_clipped
    description = dict(workload.description)
    description["scaling"] = {
        **scaling.describe(),
        "num_prompts_clipped": num_prompt_clipped,
        "num_outputs_clipped": num_output_clipped,
        "prompt_len_before": length_stats([r.prompt_len for r in workload.requests]),
        "output_len_before": length_stats([r.output_len for r in workload.requests]),
    }
    description["prompt_len"] = length_stats([r.prompt_len for r in scaled])
    description["output_len"] = length_stats([r.output_len for r in scaled])
    return replace(workload, requests=tuple(scaled), description=description)


def select(
    requests: Sequence[RequestSpec], num_requests: int, offset: int = 0
) -> list[RequestSpec]:
    """``num_requests`` consecutive requests from ``offset``, re-indexed from 0, with arrival
    offsets made relative to the first one kept."""
    if num_requests < 1:
        raise WorkloadError(f"--num-requests must be at least 1, got {num_requests}")
    if offset < 0 or offset >= len(requests):
        raise WorkloadError(
            f"offset {offset} is outside the {len(requests)} requests of the workload: pass an "
            f"offset below {len(requests)}"
        )
    kept = list(requests[offset : offset + num_requests])
    first = kept[0].arrival_s
    return [
        replace(r, index=i, arrival_s=None if first is None else r.arrival_s - first)
        for i, r in enumerate(kept)
    ]


def sample_conversations(
    requests: Sequence[RequestSpec], fraction: float, seed: int
) -> list[RequestSpec]:
    """The requests of a random ``fraction`` of a trace's conversations (drawn with ``seed``),
    every turn of each kept: a conversation is named by its first block after the prefix all
    requests share (Mooncake: the second hash id), since each turn's prompt starts with the
    earlier turns. A trace shrunk so, unlike a window of consecutive rows, keeps its reuse."""
    if not 0 < fraction <= 1:
        raise WorkloadError(f"--sample-conversations must be in (0, 1], got {fraction}")
    if any(r.segments is None for r in requests):
        raise WorkloadError(
            "--sample-conversations needs a trace whose prompts name their blocks (mooncake)"
        )

    def key(r: RequestSpec) -> tuple[int, int]:
        segments = r.segments or ()
        return (0, segments[1][0]) if len(segments) > 1 else (1, r.index)

    keys = sorted({key(r) for r in requests})
    rng = np.random.default_rng([seed, 6])
    kept = {k for k, draw in zip(keys, rng.random(len(keys)), strict=True) if draw < fraction}
    out = [replace(r, index=i) for i, r in enumerate(r for r in requests if key(r) in kept)]
    if not out:
        raise WorkloadError(f"--sample-conversations {fraction} kept no conversation: raise it")
    return out


def load_workload(
    spec: str,
    num_requests: int,
    seed: int = 0,
    offset: int = 0,
    tokenize: Callable[[str], list[int]] | None = None,
    conversations: float | None = None,
) -> Workload:
    """Parse ``KIND:PATH`` (KIND in TRACE_KINDS) or ``synthetic:SPEC`` and keep
    ``num_requests`` requests (traces: consecutive rows from ``offset``, after keeping a
    ``conversations`` fraction of its conversations if given; synthetic: drawn with ``seed``).
    ShareGPT needs ``tokenize`` (text -> token ids) to measure its texts."""
    from engine.bench import synthetic, traces

    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if sep and not rest.strip():
        raise WorkloadError(
            f"workload {spec!r}: nothing after ':': pass "
            + ("synthetic:SPEC, e.g. synthetic:prompt=40,output=lognormal:250:0.8"
               if kind == "synthetic" else f"{kind}:PATH, the path of the trace file")
        )  # fmt: skip
    if not sep:
        raise WorkloadError(
            f"workload {spec!r} has no ':': pass KIND:PATH (KIND one of {', '.join(TRACE_KINDS)}) "
            "or synthetic:SPEC, e.g. synthetic:prompt=40,output=lognormal:250:0.8"
        )
    if kind == "synthetic" and conversations is not None:
        raise WorkloadError(
            "--sample-conversations needs a trace whose prompts name their blocks (mooncake); "
            "synthetic:SPEC makes conversations of its own with turns="
        )
    if kind == "synthetic":
        requests, description = synthetic.generate(rest, num_requests, seed, tokenize)
        return Workload(
            f"synthetic:{rest}", "synthetic", tuple(requests), {"kind": "synthetic", **description}
        )
    if kind not in TRACE_KINDS:
        raise WorkloadError(
            f"unknown workload kind {kind!r}: use one of {', '.join(TRACE_KINDS)} or synthetic"
        )
    parsed = traces.parse(kind, rest, tokenize, limit=offset + num_requests)
    num_rows = len(parsed)
    if conversations is not None:
        parsed = sample_conversations(parsed, conversations, seed)
    kept = select(parsed, num_requests, offset)
    description = {
        "kind": kind,
        "path": rest,
        "num_rows": num_rows,
        "offset": offset,
        "num_requests": len(kept),
    }
    if conversations is not None:
        description["conversations_kept"] = {"fraction": conversations, "seed": seed}
    if ATTRIBUTIONS.get(kind):
        description["attribution"] = ATTRIBUTIONS[kind]
    return Workload(f"{kind}:{rest}", kind, tuple(kept), description)
