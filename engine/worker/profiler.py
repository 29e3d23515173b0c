"""Time real forward passes over a grid of shapes, for fitting the time model at start-up.

Prefill samples are (batch size, length, seconds) of ragged prefills of rows of that length;
decode samples are (batch size, context length, seconds) of decode steps over synthetic KV in
the paged pool (the values do not matter for timing, and building a real 32 x 1024 cache would
take minutes on a CPU). The same conventions as the executor's BatchDone samples: the context
length of a decode step counts the KV tokens after the step. The fit is engine/cost_model.py's job.
"""

from __future__ import annotations

import random
import time

from engine.worker.kv_pool import BlockTable, KVPool
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


def _pool(runner: Runner, num_rows: int, num_tokens: int) -> tuple[KVPool, list[BlockTable]]:
    """A pool just large enough for ``num_rows`` tables of ``num_tokens`` tokens, allocated."""
    pool = runner.new_pool(num_rows * (num_tokens + 16) * runner.info.kv_bytes_per_token)
    tables = [BlockTable() for _ in range(num_rows)]
    for table in tables:
        if not pool.allocate(table, num_tokens):
            raise RuntimeError("profiling pool too small")
    return pool, tables


def profile_prefill(
    runner: Runner, grid=PREFILL_GRID, num_repeats: int = 2, seed: int = 0
) -> list[Sample]:
    """Time a ragged prefill of random tokens for every (batch size, length) of ``grid``; the
    fastest of ``num_repeats`` runs (noise on a shared machine only ever adds time)."""
    rng = random.Random(seed)
    vocab, max_len = runner.info.vocab_size, runner.info.max_context_len - 1
    samples: list[Sample] = []
    for num_rows, num_cols in grid:
        num_cols = min(num_cols, max_len)
        timed = []
        for _ in range(num_repeats):
            lists = [_tokens(rng, vocab, num_cols) for _ in range(num_rows)]
            pool, tables = _pool(runner, num_rows, num_cols)
            started_at = time.perf_counter()
            runner.forward(pool, list(zip(tables, lists, strict=True)))
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
            pool, tables = _pool(runner, num_rows, num_cols + num_steps)
            for buf in (*pool.keys, *pool.values):
                buf.normal_()
            for table in tables:
                table.num_tokens = num_cols
            timed = []
            for _ in range(num_steps):
                rows = [(t, _tokens(rng, runner.info.vocab_size, 1)) for t in tables]
                started_at = time.perf_counter()
                runner.forward(pool, rows).argmax(-1).tolist()  # syncs, like sampling
                timed.append((time.perf_counter() - started_at, tables[0].num_tokens))
            elapsed_s, num_cols = min(timed)
            samples.append((num_rows, num_cols, elapsed_s))
            del pool
    return samples


def profile(
    runner: Runner,
    prefill_grid=PREFILL_GRID,
    batch_sizes=DECODE_BATCH_SIZES,
    context_lens=DECODE_CONTEXT_LENS,
    max_cache_bytes: int = 1 << 30,
) -> tuple[list[Sample], list[Sample]]:
    """(prefill samples, decode samples) measured on this runner's device, after a warm-up."""
    pool, tables = _pool(runner, 1, 5)
    runner.forward(pool, [(tables[0], [1, 2, 3, 4])])  # first-call allocations and dispatch
    runner.forward(pool, [(tables[0], [5])])
    prefill = profile_prefill(runner, prefill_grid)
    decode = profile_decode(runner, batch_sizes, context_lens, max_cache_bytes=max_cache_bytes)
    return prefill, decode
