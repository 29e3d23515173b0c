"""How to attend over a paged KV pool on this device: one decode step of one attention layer,
four ways, at SmolLM2-135M's shapes (9 query heads, 3 KV heads, head dim 64, blocks of 16).

Run: ``python -m engine.bench.attention_bench [--threads 1] [--device cpu]``. Prints
milliseconds per layer (fastest of 3 x 20 calls) for:

- ``contiguous``: SDPA over one [B, H, ctx, D] cache (what a left-padded cache or transformers'
  DynamicCache does; the floor, no paging);
- ``per-row view``: one SDPA per row over its blocks read in place (the engine's choice when a
  row's blocks are consecutive, which the allocator prefers);
- ``gather slots``: index_select every row's slots out of a slot-major pool, then one SDPA;
- ``gather head-major``: the same from the head-major pool the engine uses.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
SHAPES = ((1, 256), (8, 256), (32, 256), (32, 1024), (64, 512))


def best_ms(fn: Callable[[], object], calls: int = 20, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e3


def measure(batch: int, ctx: int, device: torch.device) -> dict[str, float]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    num_blocks = batch * (ctx // BLOCK + 1) + 8
    slot_major_k = randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM)
    slot_major_v = randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM)
    head_major_k = slot_major_k.transpose(0, 1).contiguous()
    head_major_v = slot_major_v.transpose(0, 1).contiguous()
    blocks = torch.randperm(num_blocks, device=device)[: batch * (ctx // BLOCK + 1)]
    slots = blocks.view(batch, -1)[:, :, None] * BLOCK + torch.arange(BLOCK, device=device)
    slots = slots.reshape(batch, -1)[:, :ctx].reshape(-1)  # scattered blocks
    q = randn(batch, Q_HEADS, 1, HEAD_DIM)
    k_cache, v_cache = randn(batch, KV_HEADS, ctx, HEAD_DIM), randn(batch, KV_HEADS, ctx, HEAD_DIM)
    runs_k, runs_v = randn(KV_HEADS, batch * ctx, HEAD_DIM), randn(KV_HEADS, batch * ctx, HEAD_DIM)

    def sdpa(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, enable_gqa=True)

    def per_row_view():
        for i in range(batch):
            lo = i * ctx
            sdpa(q[i : i + 1], runs_k[None, :, lo : lo + ctx], runs_v[None, :, lo : lo + ctx])

    def gather_slots():
        k = slot_major_k.index_select(0, slots).view(batch, ctx, KV_HEADS, HEAD_DIM)
        v = slot_major_v.index_select(0, slots).view(batch, ctx, KV_HEADS, HEAD_DIM)
        return sdpa(q, k.transpose(1, 2), v.transpose(1, 2))

    def gather_head_major():
        k = head_major_k.index_select(1, slots).view(KV_HEADS, batch, ctx, HEAD_DIM)
        v = head_major_v.index_select(1, slots).view(KV_HEADS, batch, ctx, HEAD_DIM)
        return sdpa(q, k.transpose(0, 1), v.transpose(0, 1))

    return {
        "contiguous": best_ms(lambda: sdpa(q, k_cache, v_cache)),
        "per-row view": best_ms(per_row_view),
        "gather slots": best_ms(gather_slots),
        "gather head-major": best_ms(gather_head_major),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"ms per attention layer, one decode step ({args.device}, {args.threads} threads)")
    for batch, ctx in SHAPES:
        with torch.inference_mode():
            row = measure(batch, ctx, device)
        cells = "  ".join(f"{name} {ms:7.3f}" for name, ms in row.items())
        print(f"  batch {batch:3d} context {ctx:5d}: {cells}")


if __name__ == "__main__":
    main()
