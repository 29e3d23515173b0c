"""Start-up checks that refuse a configuration that cannot serve, before it starts broken:
each raises UsageError saying what to change."""

from __future__ import annotations

from engine.cli_base import UsageError

MIN_REQUEST_TOKENS = 2  # the smallest request: one prompt token and one generated token


def check_kv_budget(
    kv_bytes_per_token: int, budget_bytes: int, max_gen_len: int | None
) -> str | None:
    """Raise UsageError when ``budget_bytes`` cannot hold even the smallest request as the
    broker's memory model counts it; return a warning when it cannot hold one request of
    ``max_gen_len`` tokens (those are then refused ``prompt_too_long``), else None."""
    from engine.cost_model import MemoryModel

    memory = MemoryModel(kv_bytes_per_token, max(budget_bytes, 1))  # blocks do not change it

    def needed(num_tokens: int) -> str:  # inverts MemoryModel.max_request_tokens
        return format_size((num_tokens + memory.slack_tokens) * kv_bytes_per_token)

    if memory.max_request_tokens() < MIN_REQUEST_TOKENS:
        raise UsageError(
            f"--kv-budget {format_size(budget_bytes)} cannot hold a single request of this model "
            f"({kv_bytes_per_token:,} bytes of KV per token): give at least "
            f"{needed(MIN_REQUEST_TOKENS)}, or leave --kv-budget out"
        )
    if max_gen_len is not None and memory.max_request_tokens() < max_gen_len + 1:
        return (
            f"--kv-budget {format_size(budget_bytes)} holds {memory.max_request_tokens():,} tokens per "
            f"request: requests asking for up to --max-gen-len {max_gen_len:,} tokens will be "
            f"refused (prompt_too_long); {needed(max_gen_len + 1)} holds one"
        )
    return None


def format_size(num_bytes: int) -> str:
    """A size as --kv-budget takes it: 1.5MiB, 17KiB, 512B."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.3g}{unit}"
    return f"{num_bytes}B"
