"""Brute-force references that the fast code is checked against."""

from __future__ import annotations

from collections.abc import Sequence

from engine.cost_model import MemoryModel


def brute_running_peak(mem: MemoryModel, rows: Sequence[tuple[int, int]]) -> int:
    """Peak KV of rows (context_len, remaining steps) sharing one left-padded cache, as the
    maximum over every future step t of (rows still running) * (width at t + slack)."""
    if not rows:
        return 0
    cache_len = max(c for c, _ in rows)
    longest = max(m for _, m in rows)
    return (
        max(
            sum(1 for _, m in rows if m >= t) * (cache_len + t + mem.slack_tokens)
            for t in range(longest + 1)
        )
        * mem.kv_bytes_per_token
    )
