"""Per-dispatch bookkeeping for the executor: checks of incoming items, and the measurements of
a batch that become its BatchDone message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine import protocol as p

if TYPE_CHECKING:  # a type only: the simulator uses DispatchStats without torch
    from engine.worker.model_loader import ModelInfo

MAX_SAMPLES = 64


class TokenStream:
    """Tokens sampled since the last Generated, per request in order (``--stream-interval``):
    they go out every ``interval`` steps, at once when a request samples its first token (its
    time to first token is not delayed), and whenever anything else goes out (a release, a
    finished batch, moved KV: a request's tokens always precede its release). Interval 1 sends
    every step's tokens, as the protocol's simplest worker does."""

    def __init__(self, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"the stream interval must be at least 1 step, got {interval}")
        self.interval = interval
        self._held: dict[str, list[int]] = {}
        self._steps = 0  # steps since the tokens last went out
        self._first = False  # a request sampled its first token since then

    def add(self, request_id: str, token: int, first: bool) -> None:
        held = self._held.get(request_id)
        if held is None:
            self._held[request_id] = [token]
        else:
            held.append(token)
        self._first = self._first or first

    def step(self) -> None:
        self._steps += 1

    def take(self, force: bool) -> p.Generated | None:
        """The Generated to send now, if due (``force``: other messages go out now)."""
        if not self._held or not (force or self._first or self._steps >= self.interval):
            return None
        tokens = list(self._held.items())
        self._held, self._steps, self._first = {}, 0, False
        return p.Generated(tokens=tokens)


class BoundedSamples:
    """At most ``max_len`` samples spread evenly over everything added: when full, every other
    sample is dropped and the keeping stride doubles."""

    def __init__(self, max_len: int = MAX_SAMPLES) -> None:
        self.max_len = max_len
        self.items: list[tuple[int, int, float]] = []
        self._stride = 1
        self._count = 0

    def add(self, sample: tuple[int, int, float]) -> None:
        if self._count % self._stride == 0:
            self.items.append(sample)
            if len(self.items) > self.max_len:
                self.items = self.items[::2]
                self._stride *= 2
        self._count += 1


@dataclass(slots=True)
class DispatchStats:
    """Counters of one RunBatch from its first step to the release of its last request."""

    batch_id: int
    num_open: int  # requests not released yet
    started_at: float | None = None  # perf_counter seconds at its first step
    steps: int = 0
    prefill_tokens: int = 0
    pad_tokens: int = 0
    recomputed_tokens: int = 0
    reused_kv_tokens: int = 0  # all of them, whichever tier or peer the KV came from
    handoff_tokens: int = 0  # of which handed off by a peer
    handoff_bytes: int = 0
    restored_tokens: int = 0  # of which restored from the host tier
    generated_tokens: int = 0
    peak_bytes: int = 0
    prefill_samples: BoundedSamples = field(default_factory=BoundedSamples)
    decode_samples: BoundedSamples = field(default_factory=BoundedSamples)
    transfer_samples: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds)
    copy_samples: list[tuple[int, float]] = field(default_factory=list)  # host-to-device restores
    mixed_samples: list[tuple[int, int, int, int, float]] = field(default_factory=list)
    prefix_query_tokens: int = 0  # context tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found there

    def done(self, now: float) -> p.BatchDone:
        return p.BatchDone(
            batch_id=self.batch_id,
            steps=self.steps,
            prefill_tokens=self.prefill_tokens,
            pad_tokens=self.pad_tokens,
            invalid_tokens=0,  # finished rows leave the batch at once: none is ever computed
            recomputed_tokens=self.recomputed_tokens,
            reused_kv_tokens=self.reused_kv_tokens,
            generated_tokens=self.generated_tokens,
            measured_s=0.0 if self.started_at is None else now - self.started_at,
            measured_peak_bytes=self.peak_bytes,
            prefill_samples=list(self.prefill_samples.items),
            decode_samples=list(self.decode_samples.items),
            handoff_tokens=self.handoff_tokens,
            handoff_bytes=self.handoff_bytes,
            restored_tokens=self.restored_tokens,
            transfer_samples=self.transfer_samples[-MAX_SAMPLES:],
            copy_samples=self.copy_samples[-MAX_SAMPLES:],
            mixed_samples=self.mixed_samples[-MAX_SAMPLES:],
            prefix_query_tokens=self.prefix_query_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
        )


def check_item(item: p.BatchItem, info: ModelInfo, busy_ids: set[str]) -> str:
    """What is wrong with an item, as a message that says what to change ("" if nothing)."""
    n, max_len, vocab = len(item.token_ids), info.max_context_len, info.vocab_size
    if item.request_id in busy_ids:
        return f"request {item.request_id} is already running on this worker"
    if n == 0:
        return "token_ids is empty: a request needs at least one token (its prompt)"
    if n >= max_len:
        return f"context has {n} tokens; the model accepts {max_len} in all: shorten it"
    if min(item.token_ids) < 0 or max(item.token_ids) >= vocab:
        pos, bad = next((i, t) for i, t in enumerate(item.token_ids) if not 0 <= t < vocab)
        return f"token id {bad} at position {pos} is outside the vocabulary [0, {vocab})"
    if item.max_steps < 1 or item.max_new_tokens < 1:
        return f"max_steps {item.max_steps} and max_new_tokens {item.max_new_tokens}: need >= 1"
    return item.sampling.problem()


def too_big(request_id: str, num_tokens: int, info: ModelInfo, kv_budget_bytes: int) -> str:
    need = num_tokens * info.kv_bytes_per_token
    return (
        f"request {request_id} needs {need} bytes of KV cache for {num_tokens} tokens; the "
        f"worker's KV budget is {kv_budget_bytes} bytes: raise --kv-budget"
    )
