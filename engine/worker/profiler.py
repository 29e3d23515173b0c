"""Time real forward passes over a grid of shapes, for fitting the time model at start-up.

Prefill samples are (batch size, padded length, seconds) of cache-building prefills; decode
samples are (batch size, context length, seconds) of decode steps over a synthetic cache (the
values do not matter for timing, and building a real 32 x 1024 cache would take minutes on a
CPU). The same conventions as the executor's BatchDone samples: the context length of a decode
step counts the cache columns after the step. The fit is engine/cost_model.py's job.
"""

from __future__ import annotations

import random
import time

from engine.worker.batch_cache import BatchCache
from engine.worker.runner import Runner

Sample = tuple[int, int, float]

#: (batch size, padded length): about 3,300 prefilled tokens, a few seconds for SmolLM2 on a
#: CPU; spans N and l separately so that a fit can tell them apart.
PREFILL_GRID: tuple[tuple[int, int], ...] = (
    (1, 16), (1, 64), (1, 256), (1, 512), (2, 128), (4, 32), (4, 128), (4, 256), (8, 64),
)  # fmt: skip
DECODE_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXT_LENS = (32, 256, 1024)
#: Shapes between the grid points, never used for fitting: `run.py profile` reports the fit's
#: error on them (the held-out error).
HELDOUT_PREFILL_GRID: tuple[tuple[int, int], ...] = ((1, 384), (2, 48), (3, 200), (6, 96))
HELDOUT_DECODE_BATCH_SIZES = (3, 12, 24)
HELDOUT_DECODE_CONTEXT_LENS = (128, 512)


def _tokens(rng: random.Random, vocab_size: int, num_tokens: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(num_tokens)]


def profile_prefill(
    runner: Runner, grid=PREFILL_GRID, num_repeats: int = 2, seed: int = 0
) -> list[Sample]:
    """Time ``runner.prefill`` of random tokens for every (batch size, length) of ``grid``; the
    fastest of ``num_repeats`` runs (noise on a shared machine only ever adds time)."""
    rng = random.Random(seed)
    vocab, max_len = runner.info.vocab_size, runner.info.max_context_len - 1
    samples: list[Sample] = []
    for num_rows, num_cols in grid:
        num_cols = min(num_cols, max_len)
        timed = []
        for _ in range(num_repeats):
            lists = [_tokens(rng, vocab, num_cols) for _ in range(num_rows)]
            started_at = time.perf_counter()
            runner.prefill(lists)
            runner.synchronize()
            timed.append(time.perf_counter() - started_at)
        samples.append((num_rows, num_cols, min(timed)))
    return samples


def profile_decode(
    runner: Runner,
    batch_sizes=DECODE_BATCH_SIZES,
    context_lens=DECODE_CONTEXT_LENS,
    num_steps: int = 3,
    max_cache_bytes: int = 1 << 30,
    seed: int = 0,
) -> list[Sample]:
    """One sample per batch size and context length whose cache fits in ``max_cache_bytes``:
    the fastest of ``num_steps`` timed decode steps (a shared machine only adds time)."""
    rng = random.Random(seed)
    kvpt = runner.info.kv_bytes_per_token
    samples: list[Sample] = []
    for num_rows in batch_sizes:
        for context_len in context_lens:
            num_cols = min(context_len, runner.info.max_context_len - num_steps - 1)
            if num_rows * (num_cols + num_steps) * kvpt > max_cache_bytes:
                continue
            cache = BatchCache.allocate(
                runner.layout, [0] * num_rows, num_cols, num_cols + num_steps
            )
            for buf in (*cache.keys, *cache.values):
                buf.normal_()
            timed = []
            for _ in range(num_steps):
                last_tokens = _tokens(rng, runner.info.vocab_size, num_rows)
                started_at = time.perf_counter()
                runner.decode(cache, last_tokens).argmax(-1).tolist()  # syncs, like sampling
                timed.append((time.perf_counter() - started_at, cache.num_cols))
            elapsed_s, num_cols = min(timed)
            samples.append((num_rows, num_cols, elapsed_s))
            del cache
    return samples


def profile(
    runner: Runner,
    prefill_grid=PREFILL_GRID,
    batch_sizes=DECODE_BATCH_SIZES,
    context_lens=DECODE_CONTEXT_LENS,
    max_cache_bytes: int = 1 << 30,
) -> tuple[list[Sample], list[Sample]]:
    """(prefill samples, decode samples) measured on this runner's device, after a warm-up."""
    runner.decode(runner.prefill([[1, 2, 3, 4]]), [5])  # first-call allocations and dispatch
    prefill = profile_prefill(runner, prefill_grid)
    decode = profile_decode(runner, batch_sizes, context_lens, max_cache_bytes=max_cache_bytes)
    return prefill, decode
