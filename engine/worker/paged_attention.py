"""Attention over the paged KV pool for a ragged batch: every row's new tokens are laid end to
end in one sequence (no padding anywhere), their keys and values are written into the row's
blocks, and each row attends to its own blocks in place.

Registered with transformers as the attention implementation ``ATTN_IMPLEMENTATION``; the model
is called with ``paged=PagedBatch(...)``, which transformers hands down to every attention layer.
A row whose blocks form one run of consecutive slots is read as a view (no copy); a row spread
over several runs is gathered first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from engine.worker.kv_pool import BlockTable, KVPool

ATTN_IMPLEMENTATION = "scls_paged"


@dataclass(frozen=True, slots=True)
class RowSpan:
    """One row of a ragged forward: its queries ``[q_start, q_start + q_len)`` in the flattened
    sequence attend to the first ``kv_len`` tokens of its blocks (its new ones included)."""

    q_start: int
    q_len: int
    kv_len: int
    run: tuple[int, int] | None  # (first slot, length) when one run holds all kv_len tokens
    index: torch.Tensor | None  # [kv_len] slot indices otherwise
    mask: torch.Tensor | None  # [q_len, kv_len] bool, causal aligned to the end (prefix + new)


@dataclass(frozen=True, slots=True)
class PagedBatch:
    pool: KVPool
    slot_mapping: torch.Tensor  # [T] slot of every new token, T = sum of q_len
    rows: tuple[RowSpan, ...]

    @classmethod
    def build(cls, pool: KVPool, rows: list[tuple[BlockTable, int, int]]) -> PagedBatch:
        """``rows``: (table, start, num_new) per row, the table already allocated to hold
        ``start + num_new`` tokens; the new tokens' KV goes to positions ``start ..``."""
        bt, device = pool.block_tokens, pool.layout.device
        slots: list[int] = []
        spans = []
        for table, start, num_new in rows:
            kv_len = start + num_new
            runs = table.runs(bt, kv_len)
            run = runs[0] if len(runs) == 1 else None
            index = None
            if run is None:
                index = torch.tensor(table.slots(bt, 0, kv_len), dtype=torch.long, device=device)
            mask = None
            if 1 < num_new < kv_len:  # new tokens after a cached prefix: causal from the end
                q_pos = torch.arange(start, kv_len, device=device)[:, None]
                mask = torch.arange(kv_len, device=device)[None, :] <= q_pos
            spans.append(RowSpan(len(slots), num_new, kv_len, run, index, mask))
            slots += table.slots(bt, start, num_new)
        mapping = torch.tensor(slots, dtype=torch.long, device=device)
        return cls(pool, mapping, tuple(spans))


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged: PagedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (the new tokens, rotary applied) ->
    attention output [1, T, Hq, D]."""
    if paged is None:
        raise RuntimeError(f"attention {ATTN_IMPLEMENTATION!r} needs the paged= batch argument")
    layer = module.layer_idx
    kbuf, vbuf = paged.pool.keys[layer], paged.pool.values[layer]  # [Hkv, slots, D]
    kbuf.index_copy_(1, paged.slot_mapping, key[0])
    vbuf.index_copy_(1, paged.slot_mapping, value[0])
    outs = []
    for row in paged.rows:
        q = query[:, :, row.q_start : row.q_start + row.q_len]  # [1, Hq, q_len, D]
        if row.run is not None:
            first, n = row.run
            k, v = kbuf[None, :, first : first + n], vbuf[None, :, first : first + n]
        else:
            k, v = kbuf.index_select(1, row.index)[None], vbuf.index_select(1, row.index)[None]
        outs.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=row.mask,
                is_causal=row.mask is None and row.q_len > 1,  # a whole prompt: q_len == kv_len
                scale=scaling,
                enable_gqa=True,
            )
        )
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [1, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
