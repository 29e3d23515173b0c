"""Building dispatches and driving an Executor the way the broker would, for the worker tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from engine import protocol as p
from engine.worker.executor import Executor
from engine.worker.runner import Runner

BIG_BUDGET = 1 << 30  # bytes: the memory guard never binds


def make_prompts(seed: int, lens: list[int], vocab_size: int = 512) -> list[list[int]]:
    """Random token ids (no special tokens: ids 3..vocab-1)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lens]


def make_item(
    request_id: str,
    token_ids: list[int],
    *,
    max_steps: int = 8,
    max_new_tokens: int = 1000,
    num_generated: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    ignore_eos: bool = True,
    keep_kv: bool = False,
) -> p.BatchItem:
    return p.BatchItem(
        request_id=request_id,
        token_ids=list(token_ids),
        num_generated=num_generated,
        max_steps=max_steps,
        max_new_tokens=max_new_tokens,
        sampling=p.SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, ignore_eos=ignore_eos
        ),
        keep_kv=keep_kv,
    )


def make_run(batch_id: int, items: list[p.BatchItem], join: bool = False) -> p.RunBatch:
    max_steps = max((i.max_steps for i in items), default=0)
    return p.RunBatch(
        batch_id=batch_id,
        items=items,
        join=join,
        predicted_s=0.0,
        predicted_peak_bytes=0,
        max_steps=max_steps,
    )


@dataclass
class Trace:
    """Everything an executor sent while it was drained."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    released: dict[str, p.Released] = field(default_factory=dict)
    all_released: list[p.Released] = field(default_factory=list)
    done: dict[int, p.BatchDone] = field(default_factory=dict)
    evicted: list[str] = field(default_factory=list)
    max_kv_used_bytes: int = 0
    num_steps: int = 0

    def record(self, executor: Executor, result) -> None:
        if result.generated is not None:
            for request_id, tokens in result.generated.tokens:
                self.tokens.setdefault(request_id, []).extend(tokens)
        for msg in result.released:
            self.released[msg.request_id] = msg
            self.all_released.append(msg)
        for msg in result.done:
            assert msg.batch_id not in self.done, "BatchDone sent twice"
            self.done[msg.batch_id] = msg
        self.evicted += result.evicted
        self.max_kv_used_bytes = max(self.max_kv_used_bytes, executor.kv_used_bytes)
        self.num_steps += 1


def drain(executor: Executor, trace: Trace | None = None, max_steps: int = 10_000) -> Trace:
    """Step until the executor has no work left."""
    trace = trace or Trace()
    for _ in range(max_steps):
        if not executor.has_work():
            return trace
        trace.record(executor, executor.step())
    raise AssertionError(f"executor still busy after {max_steps} steps")


def generate_sliced(
    executor: Executor,
    prompts: dict[str, list[int]],
    num_tokens: int,
    slice_len: int,
    keep_kv: bool,
    first_batch_id: int = 1,
    **item_kwargs,
) -> dict[str, list[int]]:
    """Serve every prompt for ``num_tokens`` tokens in slices of ``slice_len`` steps, each
    slice one sequential batch of all unfinished requests (SCLS with one worker)."""
    generated: dict[str, list[int]] = {rid: [] for rid in prompts}
    batch_id = first_batch_id
    while True:
        items = [
            make_item(
                rid,
                prompts[rid] + out,
                max_steps=slice_len,
                max_new_tokens=num_tokens - len(out),
                num_generated=len(out),
                keep_kv=keep_kv,
                **item_kwargs,
            )
            for rid, out in generated.items()
            if len(out) < num_tokens
        ]
        if not items:
            return generated
        executor.submit(make_run(batch_id, items))
        trace = drain(executor)
        for rid, tokens in trace.tokens.items():
            generated[rid] += tokens
        for msg in trace.all_released:
            assert msg.reason in ("budget", "length"), msg
            assert msg.kv_kept == (keep_kv and msg.reason == "budget"), msg
        batch_id += 1


def drain_steps(executor: Executor, num_steps: int, trace: Trace | None = None) -> Trace:
    """Exactly ``num_steps`` steps."""
    trace = trace or Trace()
    for _ in range(num_steps):
        trace.record(executor, executor.step())
    return trace


def solo_greedy(runner: Runner, prompt: list[int], num_tokens: int, **item_kwargs) -> list[int]:
    """Greedy tokens of one request served alone in one dispatch (the reference)."""
    executor = Executor(runner, BIG_BUDGET)
    item = make_item("solo", prompt, max_steps=num_tokens, **item_kwargs)
    executor.submit(make_run(1, [item]))
    return drain(executor).tokens["solo"]
