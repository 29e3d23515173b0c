"""Time real forward passes over a few chosen shapes, for fitting the time model at start-up.

Prefill samples are (batch size, length, seconds) of ragged prefills of rows of that length;
decode samples are (batch size, context length, seconds) of decode steps over synthetic KV in
the paged pool (the values do not matter for timing, and building a real 32 x 1024 cache would
take minutes on a CPU). The same conventions as the executor's BatchDone samples: the context
length of a decode step counts the KV tokens after the step. The fit is engine/cost_model.py's job.

The shapes are few on purpose (a first start must serve within seconds, and the broker refines
the model online from every batch): each grid spans its two dimensions at their ends, with
more shapes than the fit has terms. SmolLM2, float32, one thread of a 2-core CPU that other
work also used: 17 shapes in 8.5-11.4 s, where the 26 shapes before took 24.5 s; held-out
error (`run.py profile`) prefill 3.2-3.4% (before 1.9%), decode 12.2-12.5% (before 12.4%):
on that CPU a step of 2 or 3 rows is slower than one of 4 (its matmul kernels), which no
linear time model follows; without batch 3 the decode error is 1.6-2.8% (before 3.1%).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from engine.worker.kv_pool import BlockTable, KVPool
from engine.worker.runner import Runner

Sample = tuple[int, int, float]
#: ``on_progress(shapes done, shapes in all)``, called after each timed shape.
Progress = Callable[[int, int], None]

#: (batch size, length): 6 shapes for a 5-term fit, about 1,100 prefilled tokens; lengths 16 to
#: 512 (the executor's prefill chunk) at one row, and 2 to 8 rows, so that a fit tells N, l and
#: the attention term l^2 apart. Chosen from a profile of every shape below: the held-out error
#: stays within a point of the 9-shape grid that cost 3x as long.
PREFILL_GRID: tuple[tuple[int, int], ...] = (
    (1, 16), (1, 64), (1, 512), (2, 128), (4, 32), (8, 64),
)  # fmt: skip
#: Prefills of at most this many tokens are timed twice (the faster counts): a scheduling
#: hiccup of a few ms weighs on them; on longer ones it is lost in the time itself.
REPEAT_BELOW_TOKENS = 256
#: (batch size, context length): the batch sizes the scheduler forms, short and long contexts,
#: one longer still; all share one pool (the rows of a smaller batch are the first rows).
DECODE_GRID: tuple[tuple[int, int], ...] = (
    (1, 64), (1, 512), (2, 64), (2, 512), (4, 64), (4, 512), (8, 1024), (16, 64), (16, 512),
    (32, 64), (32, 512),
)  # fmt: skip
#: Shapes between the grid points, never used for fitting: `run.py profile` reports the fit's
#: error on them (the held-out error).
HELDOUT_PREFILL_GRID: tuple[tuple[int, int], ...] = ((1, 384), (2, 48), (3, 200), (6, 96))
HELDOUT_DECODE_GRID: tuple[tuple[int, int], ...] = tuple(
    (n, c) for n in (3, 12, 24) for c in (128, 512)
)


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
    runner: Runner,
    grid=PREFILL_GRID,
    num_repeats: int = 2,
    seed: int = 0,
    on_shape: Callable[[], None] | None = None,
) -> list[Sample]:
    """Time a ragged prefill of random tokens for every (batch size, length) of ``grid``; the
    fastest of ``num_repeats`` runs for the short ones (noise on a shared machine only ever adds
    time)."""
    rng = random.Random(seed)
    vocab, max_len = runner.info.vocab_size, runner.info.max_context_len - 1
    samples: list[Sample] = []
    for num_rows, num_cols in grid:
        num_cols = min(num_cols, max_len)
        timed = []
        repeats = num_repeats if num_rows * num_cols <= REPEAT_BELOW_TOKENS else 1
        for _ in range(repeats):
            lists = [_tokens(rng, vocab, num_cols) for _ in range(num_rows)]
            pool, tables = _pool(runner, num_rows, num_cols)
            started_at = time.perf_counter()
            runner.forward(pool, list(zip(tables, lists, strict=True)))
            runner.synchronize()
            timed.append(time.perf_counter() - started_at)
        samples.append((num_rows, num_cols, min(timed)))
        if on_shape is not None:
            on_shape()
    return samples


def _decode_pool(
    runner: Runner, shapes: list[tuple[int, int]], extra: int
) -> tuple[KVPool, list[BlockTable]]:
    """One pool for every decode shape: row i holds the longest context of the shapes with
    more than i rows, plus ``extra`` tokens; filled once with zeros (pages committed, no
    denormals)."""
    num_rows = max(n for n, _ in shapes)
    lengths = [max(c for n, c in shapes if n > i) + extra for i in range(num_rows)]
    pool = runner.new_pool((sum(lengths) + 16 * num_rows) * runner.info.kv_bytes_per_token)
    tables = [BlockTable() for _ in range(num_rows)]
    for table, length in zip(tables, lengths, strict=True):
        if not pool.allocate(table, length):
            raise RuntimeError("profiling pool too small")
    for buf in (*pool.keys, *pool.values):
        buf.zero_()
    return pool, tables


def profile_decode(
    runner: Runner,
    grid=DECODE_GRID,
    num_steps: int = 3,
    max_cache_bytes: int = 1 << 30,
    seed: int = 0,
    on_shape: Callable[[], None] | None = None,
) -> list[Sample]:
    """One sample per (batch size, context length) of ``grid`` whose share of the pool fits in
    ``max_cache_bytes``: the fastest of ``num_steps`` timed decode steps (a shared machine only
    adds time; the first step also commits fresh pages)."""
    rng = random.Random(seed)
    kvpt, max_len = runner.info.kv_bytes_per_token, runner.info.max_context_len - num_steps - 1
    shapes = [
        (n, min(c, max_len)) for n, c in grid if n * (c + num_steps) * kvpt <= max_cache_bytes
    ]
    if not shapes:
        return []
    pool, tables = _decode_pool(runner, shapes, num_steps)
    samples: list[Sample] = []
    for num_rows, num_cols in shapes:
        rows = tables[:num_rows]
        for table in rows:
            table.num_tokens = num_cols
        timed = []
        for _ in range(num_steps):
            batch = [(t, _tokens(rng, runner.info.vocab_size, 1)) for t in rows]
            started_at = time.perf_counter()
            runner.forward(pool, batch).argmax(-1).tolist()  # syncs, like sampling
            timed.append((time.perf_counter() - started_at, rows[0].num_tokens))
        elapsed_s, context_len = min(timed)
        samples.append((num_rows, context_len, elapsed_s))
        if on_shape is not None:
            on_shape()
    return samples


def profile(
    runner: Runner,
    prefill_grid=PREFILL_GRID,
    decode_grid=DECODE_GRID,
    max_cache_bytes: int = 1 << 30,
    on_progress: Progress | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """(prefill samples, decode samples) measured on this runner's device, after a warm-up;
    ``on_progress(done, total)`` after each shape."""
    pool, tables = _pool(runner, 1, 5)
    runner.forward(pool, [(tables[0], [1, 2, 3, 4])])  # first-call allocations and dispatch
    runner.forward(pool, [(tables[0], [5])])
    total, done = len(prefill_grid) + len(decode_grid), 0

    def step() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    prefill = profile_prefill(runner, prefill_grid, on_shape=step)
    decode = profile_decode(runner, decode_grid, max_cache_bytes=max_cache_bytes, on_shape=step)
    return prefill, decode
