"""The model's forward passes and sampling, nano-vllm style: prepare inputs, run, sample.

A forward is ragged: the rows' new tokens are laid end to end (no padding), each at its own
positions, and attend to their own blocks of the paged KV pool (engine/worker/paged_attention.py).
The same call prefills (a row's whole context) and decodes (one token per row), so batching never
changes a row's result (exactly so in float32 on this machine: see tests/worker/test_runner.py).
"""

from __future__ import annotations

import os
import time

import torch

from engine.protocol import SamplingParams
from engine.worker.kv_pool import DEFAULT_BLOCK_TOKENS, BlockTable, KVLayout, KVPool
from engine.worker.model_loader import LoadedModel, ModelInfo
from engine.worker.paged_attention import ATTN_IMPLEMENTATION, PagedBatch

_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed for the ``index``-th generated token of a request (splitmix64),
    so that sampling does not depend on batching or slicing."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class Runner:
    """Runs ragged forward passes of one model over a paged KV pool and samples tokens."""

    def __init__(self, loaded: LoadedModel, slowdown: float = 1.0) -> None:
        self.model = loaded.model
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.info: ModelInfo = loaded.info
        self.device = loaded.device
        self.layout = KVLayout(
            num_layers=loaded.info.num_layers,
            num_kv_heads=loaded.info.num_kv_heads,
            head_dim=loaded.info.head_dim,
            dtype=loaded.dtype,
            device=loaded.device,
        )
        # Benchmarks only: every forward pass takes this many times as long (the rest asleep,
        # so the CPU goes to others), to emulate a slower device beside faster ones.
        self.slowdown = slowdown
        self._unseeded = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))

    def new_pool(
        self, budget_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS, prefix_cache: bool = True
    ) -> KVPool:
        """A KV pool of this model's layout holding at most ``budget_bytes``."""
        return KVPool(self.layout, budget_bytes, block_tokens, prefix_cache)

    def synchronize(self) -> None:
        """Wait for queued device work (GPU), so that wall-clock timings are real."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- forward -------------------------------------------------------------------------------

    def prepare(self, pool: KVPool, rows: list[tuple[BlockTable, list[int]]]):
        """Inputs of one ragged forward: each row's new tokens laid end to end, at positions
        after the KV its table holds."""
        ids: list[int] = []
        positions: list[int] = []
        for table, tokens in rows:
            ids += tokens
            positions += range(table.num_tokens, table.num_tokens + len(tokens))
        batch = PagedBatch.build(pool, [(t, t.num_tokens, len(toks)) for t, toks in rows])
        last = [r.q_start + r.q_len - 1 for r in batch.rows]
        dev = self.device
        return (
            torch.tensor([ids], dtype=torch.long, device=dev),  # [1, T]
            torch.tensor([positions], dtype=torch.long, device=dev),  # [1, T]
            torch.tensor(last, dtype=torch.long, device=dev),  # [R]
            batch,
        )

    @torch.inference_mode()
    def forward(self, pool: KVPool, rows: list[tuple[BlockTable, list[int]]]) -> torch.Tensor:
        """Feed each row's new tokens (at least one each) after the KV its table holds; each
        table must already have blocks for them. Their KV is written into the pool and the
        tables advance. Returns each row's last-position logits [R, V] (float32)."""
        started_at = time.perf_counter()
        ids, positions, last, batch = self.prepare(pool, rows)
        out = self.model(
            input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=last, paged=batch
        )
        for table, tokens in rows:
            table.num_tokens += len(tokens)
        logits = out.logits[0].float()  # [R, V]
        if self.slowdown > 1:
            self.synchronize()
            time.sleep((self.slowdown - 1) * (time.perf_counter() - started_at))
        return logits

    # -- sampling ------------------------------------------------------------------------------

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], token_indices: list[int]
    ) -> list[int]:
        """One token per row of ``logits`` [B, V]: greedy rows by argmax, others by seeded
        sampling (``token_indices``: index of the token being generated, per row)."""
        tokens = logits.argmax(dim=-1).tolist()  # [B]
        for row, p in enumerate(params):
            if not p.greedy:
                tokens[row] = self._sample_row(logits[row], p, token_indices[row])
        return tokens

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, index: int) -> int:
        scores = logits.detach().float().cpu() / p.temperature  # [V]
        if 0 < p.top_k < scores.shape[0]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # the first token is always kept
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        if p.seed is None:
            generator = self._unseeded
        else:
            generator = torch.Generator().manual_seed(token_seed(p.seed, index))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())
