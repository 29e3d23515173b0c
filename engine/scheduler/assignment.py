"""Assignment of batches to workers (the paper's "offloading") by the max-min rule on predicted
completion time: at most one batch per worker, the latest predicted completion as early as
possible, so that the workers' expected completion times stay balanced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_EXACT_WORKERS = 8  # exact search over worker subsets: O(2^m * m) steps
_BITS = [
    [w for w in range(MAX_EXACT_WORKERS) if mask >> w & 1] for mask in range(1 << MAX_EXACT_WORKERS)
]  # the set bits of every worker subset
_POPCOUNT = [len(bits) for bits in _BITS]


def makespan(completion_s: Sequence[Sequence[float]], assignment: Sequence[int]) -> float:
    """The latest predicted completion of an assignment (batch b -> worker assignment[b])."""
    return max((completion_s[b][w] for b, w in enumerate(assignment)), default=-math.inf)


def assign_min_max(completion_s: Sequence[Sequence[float]]) -> list[int]:
    """Worker index for each batch; ``completion_s[b][w]``: when batch b would end on worker w
    (inf where it does not fit). Needs no more batches than workers. With up to
    MAX_EXACT_WORKERS workers the latest completion is the least possible (exact dynamic
    programming over worker subsets, ties broken by the smaller sum); beyond, the greedy
    max-min heuristic."""
    num_batches = len(completion_s)
    if num_batches == 0:
        return []
    num_workers = len(completion_s[0])
    if num_batches > num_workers:
        raise ValueError(
            f"{num_batches} batches for {num_workers} workers: form at most one batch per worker"
        )
    if num_workers > MAX_EXACT_WORKERS:
        return assign_greedy_max_min(completion_s)
    return _assign_exact(completion_s, num_batches, num_workers)


def _assign_exact(completion_s: Sequence[Sequence[float]], k: int, m: int) -> list[int]:
    # best[mask]: (latest completion, sum) of the first popcount(mask) batches on workers mask.
    # Taking the least latest completion per mask is exact for that component (max is monotone).
    size = 1 << m
    best: list[tuple[float, float] | None] = [None] * size
    best[0] = (-math.inf, 0.0)
    parent = [0] * size
    for mask in range(1, size):
        i = _POPCOUNT[mask]
        if i > k:
            continue
        row = completion_s[i - 1]
        found: tuple[float, float] | None = None
        for w in _BITS[mask]:
            prev = best[mask ^ (1 << w)]
            if prev is None:
                continue
            cand = (prev[0] if prev[0] > row[w] else row[w], prev[1] + row[w])
            if found is None or cand < found:
                found, parent[mask] = cand, w
        best[mask] = found
    final = min((v, mask) for mask, v in enumerate(best) if v is not None and _POPCOUNT[mask] == k)
    result = [0] * k
    mask = final[1]
    for i in range(k - 1, -1, -1):
        result[i] = parent[mask]
        mask ^= 1 << result[i]
    return result


def assign_greedy_max_min(completion_s: Sequence[Sequence[float]]) -> list[int]:
    """Max-min heuristic: for every unplaced batch find its earliest completion over the free
    workers; place the batch whose earliest completion is latest there; repeat. Optimal when
    workers differ only in when they become free (completion = free_at[w] + duration[b])."""
    num_workers = len(completion_s[0]) if completion_s else 0
    free = set(range(num_workers))
    unplaced = set(range(len(completion_s)))
    result = [0] * len(completion_s)
    while unplaced:
        order = sorted(free)  # ties go to the lowest worker index
        choices = {b: min(order, key=completion_s[b].__getitem__) for b in unplaced}
        batch = max(unplaced, key=lambda b: (completion_s[b][choices[b]], -b))
        result[batch] = choices[batch]
        free.discard(choices[batch])
        unplaced.discard(batch)
    return result
