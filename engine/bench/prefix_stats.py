"""What a workload's prompts could reuse: the ideal prefix-cache hit rate, as an infinite cache
that keeps every full block of every earlier prompt would reach it. The engine's measured
``prefix_hit_rate`` is judged against it (its cache is finite, and a request that arrives while
its prefix is still being prefilled elsewhere finds nothing yet).

Counted as a worker counts: blocks of ``block_tokens`` tokens named by their token chain
(engine/prefix_hash.py), the leading blocks of ``prompt[:-1]`` found (the last prompt token is
fed by the first decode step); a prompt's own full blocks are cached after it. Generated tokens
are not counted: a benchmark's outputs do not recur in later prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.prefix_hash import block_hashes, prefix_root

WORKER_BLOCK_TOKENS = 16  # engine/worker/kv_pool.py DEFAULT_BLOCK_TOKENS (no torch here)


def ideal_prefix_hits(
    prompts: Sequence[Sequence[int]], block_tokens: int = WORKER_BLOCK_TOKENS
) -> dict[str, Any]:
    root = prefix_root("ideal", "any", block_tokens)
    seen: set[bytes] = set()
    total = hits = 0
    for prompt in prompts:
        names = block_hashes(prompt, block_tokens, root)
        usable = (len(prompt) - 1) // block_tokens
        n = 0
        while n < usable and names[n] in seen:
            n += 1
        hits += n * block_tokens
        total += len(prompt)
        seen.update(names)
    return {
        "block_tokens": block_tokens,
        "prompt_tokens": total,
        "ideal_cached_tokens": hits,
        "ideal_hit_rate": hits / total if total else 0.0,
    }
