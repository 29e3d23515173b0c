"""Prompts of an exact token count, made from the model's own tokenizer, the same for the same
seed (benchmarks send them as ``prompt_ids``, so the engine sees exactly that many tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_TEXT = """\
A serving engine receives requests from many users at once. Each request carries a prompt, and
the engine must generate an answer token by token. Short answers should not wait behind long
ones, and memory for the cache of keys and values grows with every generated token. The
scheduler therefore decides which requests run together, on which worker, and for how long.
Slices of a fixed number of steps bound both the time and the memory of every batch, so that
the engine never runs out of memory and the workers stay evenly loaded. History, geography,
music and mathematics are subjects; rivers flow to the sea; mountains rise above the clouds;
the library opens at nine in the morning and closes at six in the evening. Bread is baked
from flour, water, salt and yeast. Trains leave the station every quarter of an hour, and the
last one departs shortly before midnight. The weather today is mild, with a light breeze from
the west and a few clouds over the hills. Engineers measure throughput, latency and memory,
compare the figures with a baseline, and write down how every number was obtained.
"""


class PromptError(ValueError):
    """The tokenizer cannot produce prompts; the message says what to pass instead."""


class PromptMaker:
    """``make(index, length)``: ``length`` token ids that start with a per-request header
    ("Request 17: ") followed by ordinary text from a random offset (seeded by seed and index),
    so prompts are readable, distinct (no shared prefix blocks) and repeatable."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pool = [t for t in self._encode(_TEXT) if t not in special]
        if len(pool) < 16:
            raise PromptError(
                f"the tokenizer turned the prompt text into {len(pool)} ordinary tokens: it "
                "needs a tokenizer that encodes plain English text"
            )
        self._pool = np.asarray(pool, dtype=np.int64)
        self._special = special

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def make(
        self,
        index: int,
        length: int,
        base_ids: Sequence[int] | None = None,
        segments: Sequence[tuple[int, int]] | None = None,
    ) -> list[int]:
        """Exactly ``length`` ids (>= 1). ``base_ids`` (a trace's real prompt) are used first,
        cut to ``length`` or extended with text; else ``segments`` (RequestSpec.segments: the
        same id gives the same tokens in every prompt, so that prompts share prefixes)."""
        if length < 1:
            raise PromptError(f"prompt length must be at least 1 token, got {length}")
        if base_ids is not None:
            head = list(base_ids)
        elif segments:
            head = [t for sid, n in segments for t in self.segment(sid, n)]
        else:
            head = self._header(index)
        if len(head) >= length:
            return head[:length]
        rng = np.random.default_rng([self.seed, 3, index])
        start = int(rng.integers(len(self._pool)))
        num_rest = length - len(head)
        positions = (start + np.arange(num_rest)) % len(self._pool)
        return head + [int(t) for t in self._pool[positions]]

    def segment(self, segment_id: int, length: int) -> list[int]:
        """The first ``length`` tokens of segment ``segment_id``: ordinary tokens drawn at
        random (seeded by the segment), so that two segments never share a prefix by chance."""
        rng = np.random.default_rng([self.seed, 5, segment_id])
        return [int(t) for t in self._pool[rng.integers(len(self._pool), size=length)]]

    def _header(self, index: int) -> list[int]:
        return [t for t in self._encode(f"Request {index}: ") if t not in self._special]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
