"""The running rows' KV cache: left-padded per-layer buffers that decode steps append to in place.

Row ``i`` holds real keys and values in columns ``[pad_lens[i], num_cols)``; padded columns are
zero and masked out. Buffers have spare capacity so that a decode step writes one column instead
of copying the whole cache (what ``DynamicCache``'s concatenation would do every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def empty(self, num_rows: int, num_cols: int) -> list[torch.Tensor]:
        """One zeroed buffer per layer: [num_rows, kv_heads, num_cols, head_dim]."""
        shape = (num_rows, self.num_kv_heads, num_cols, self.head_dim)
        return [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]


class _BufferLayer(DynamicLayer):
    """A DynamicLayer whose keys/values view preallocated buffers; update writes in place."""

    def __init__(self, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> None:
        super().__init__()
        self.k_buf, self.v_buf = k_buf, v_buf  # [B, H, capacity, D]
        self.length = length
        self.device = k_buf.device
        self.is_initialized = True
        self.keys, self.values = k_buf[:, :, :length], v_buf[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.k_buf.shape[-2]:
            raise RuntimeError(f"KV buffer overflow: {end} > {self.k_buf.shape[-2]} columns")
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values


class BatchCache:
    """KV of ``num_rows`` rows, left-padded to ``num_cols`` columns, in buffers of ``capacity``."""

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        num_cols: int,
        pad_lens: list[int],
    ) -> None:
        self.keys, self.values = keys, values  # per layer [B, H, capacity, D]
        self.num_cols = num_cols
        self.pad_lens = list(pad_lens)  # [B] leading padding columns per row

    @classmethod
    def allocate(cls, layout: KVLayout, pad_lens: list[int], num_cols: int, capacity: int):
        keys, values = layout.empty(len(pad_lens), capacity), layout.empty(len(pad_lens), capacity)
        return cls(keys, values, num_cols, pad_lens)

    @classmethod
    def from_row(cls, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> BatchCache:
        """A one-row cache from unpadded per-layer (k, v), each [1, H, len, D] (taken as is)."""
        return cls([k for k, _ in kv], [v for _, v in kv], kv[0][0].shape[-2], [0])

    @property
    def num_rows(self) -> int:
        return len(self.pad_lens)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the buffers (spare capacity included)."""
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def row_len(self, row: int) -> int:
        return self.num_cols - self.pad_lens[row]

    def row_lens(self) -> list[int]:
        return [self.num_cols - pad for pad in self.pad_lens]

    def key_mask(self) -> torch.Tensor:
        """[B, num_cols] bool: True where a column holds a real token of that row."""
        cols = torch.arange(self.num_cols, device=self.keys[0].device)
        pads = torch.tensor(self.pad_lens, device=cols.device)
        return cols[None, :] >= pads[:, None]

    def reserve(self, extra_cols: int, growth_cols: int) -> None:
        """Make room for ``extra_cols`` more columns, growing by at least ``growth_cols``."""
        needed = self.num_cols + extra_cols
        if needed <= self.capacity:
            return
        new_capacity = max(needed, self.num_cols + growth_cols)
        for bufs in (self.keys, self.values):
            for i, buf in enumerate(bufs):  # one layer at a time: the transient copy is one layer
                grown = buf.new_zeros((*buf.shape[:2], new_capacity, buf.shape[3]))
                grown[:, :, : self.num_cols] = buf[:, :, : self.num_cols]
                bufs[i] = grown

    def hf_cache(self) -> DynamicCache:
        """A transformers cache whose layers write into these buffers; call ``advance`` after."""
        cache = DynamicCache()
        cache.layers = [
            _BufferLayer(k, v, self.num_cols) for k, v in zip(self.keys, self.values, strict=True)
        ]
        return cache

    def advance(self, num_cols: int) -> None:
        self.num_cols += num_cols

    def zero_padding(self) -> None:
        """Zero padded columns so that a masked position can never carry NaN or inf."""
        keep = self.key_mask()[:, None, :, None]  # [B, 1, T, 1]
        for buf in (*self.keys, *self.values):
            buf[:, :, : self.num_cols].mul_(keep)

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one row's real KV, per layer (k, v) each [1, H, row_len, D]."""
        lo, hi = self.pad_lens[row], self.num_cols
        return [
            (k[row : row + 1, :, lo:hi].clone(), v[row : row + 1, :, lo:hi].clone())
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop leading columns padded in every row."""
        pads = [self.pad_lens[r] for r in rows]
        trim = min(pads, default=0)
        index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
        for bufs in (self.keys, self.values):
            for i, buf in enumerate(bufs):
                bufs[i] = buf[:, :, trim:].index_select(0, index)
        self.pad_lens = [p - trim for p in pads]
        self.num_cols -= trim


def merge(layout: KVLayout, parts: list[BatchCache], spare_cols: int) -> BatchCache:
    """One left-padded cache of all rows of ``parts`` (in order), with ``spare_cols`` of spare
    capacity. Consumes the parts: their buffers are released layer by layer while copying."""
    num_cols = max((p.row_len(r) for p in parts for r in range(p.num_rows)), default=0)
    pad_lens = [num_cols - p.row_len(r) for p in parts for r in range(p.num_rows)]
    capacity = num_cols + spare_cols
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for layer in range(layout.num_layers):
        for out, src_name in ((keys, "keys"), (values, "values")):
            buf = torch.zeros(
                (len(pad_lens), layout.num_kv_heads, capacity, layout.head_dim),
                dtype=layout.dtype,
                device=layout.device,
            )
            row = 0
            for part in parts:
                src = getattr(part, src_name)
                width = min(part.num_cols, num_cols)  # part columns beyond are padding everywhere
                lo = part.num_cols - width
                buf[row : row + part.num_rows, :, num_cols - width : num_cols] = src[layer][
                    :, :, lo : part.num_cols
                ]
                src[layer] = src[layer].new_empty(0)  # release this layer of the part
                row += part.num_rows
            out.append(buf)
    return BatchCache(keys, values, num_cols, pad_lens)
