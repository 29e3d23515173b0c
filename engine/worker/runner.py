"""The model's forward passes and sampling, nano-vllm style: prepare inputs, run, sample.

Invariant: a row's cache covers its ``token_ids[:-1]``; a decode step feeds each row's last
token and samples one new token. Prefill builds a row's cache from ``token_ids[:-1]``. Rows are
left-padded with explicit attention masks and position ids, so batching never changes a row's
result (exactly so in float32 on this machine: see tests/worker/test_runner.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from engine.worker.batch_cache import BatchCache, KVLayout
from engine.worker.model_loader import LoadedModel, ModelInfo

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: not reproducible

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def token_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed for the ``index``-th generated token of a request (splitmix64),
    so that sampling does not depend on batching or slicing."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class Runner:
    """Runs prefill and decode forward passes of one model and samples tokens."""

    def __init__(
        self, loaded: LoadedModel, kv_growth_cols: int = 32, slowdown: float = 1.0
    ) -> None:
        self.model = loaded.model
        self.info: ModelInfo = loaded.info
        self.device = loaded.device
        self.layout = KVLayout(
            num_layers=loaded.info.num_layers,
            num_kv_heads=loaded.info.num_kv_heads,
            head_dim=loaded.info.head_dim,
            dtype=loaded.dtype,
            device=loaded.device,
        )
        self.kv_growth_cols = kv_growth_cols  # spare columns added when a cache grows
        # Benchmarks only: every forward pass takes this many times as long (the rest asleep,
        # so the CPU goes to others), to emulate a slower device beside faster ones.
        self.slowdown = slowdown
        self._unseeded = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))

    def synchronize(self) -> None:
        """Wait for queued device work (GPU), so that wall-clock timings are real."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- prefill -------------------------------------------------------------------------------

    def prepare_prefill(self, token_lists: list[list[int]]):
        """Left-padded inputs for a cache-building prefill of ``token_lists`` (each non-empty
        list or empty; at least one non-empty)."""
        lens = [len(t) for t in token_lists]
        num_cols = max(lens)
        pad_lens = [num_cols - n for n in lens]
        ids = torch.zeros((len(lens), num_cols), dtype=torch.long)  # [B, T]
        for row, tokens in enumerate(token_lists):
            ids[row, pad_lens[row] :] = torch.tensor(tokens, dtype=torch.long)
        pads = torch.tensor(pad_lens)[:, None]  # [B, 1]
        cols = torch.arange(num_cols)[None, :]  # [1, T]
        valid = cols >= pads  # [B, T]
        positions = (cols - pads).clamp(min=0)  # [B, T]
        causal = torch.ones((num_cols, num_cols), dtype=torch.bool).tril()  # [T, T]
        # A padded query attends to itself only, so that no attention row is fully masked.
        mask = (causal[None] & valid[:, None, :]) | torch.eye(num_cols, dtype=torch.bool)[None]
        dev = self.device
        return ids.to(dev), positions.to(dev), mask[:, None].to(dev), pad_lens  # mask [B,1,T,T]

    @torch.inference_mode()
    def prefill(self, token_lists: list[list[int]]) -> BatchCache:
        """A cache of the given token lists (left-padded; padded K/V zeroed)."""
        num_cols = max((len(t) for t in token_lists), default=0)
        if num_cols == 0:
            return BatchCache.allocate(self.layout, [0] * len(token_lists), 0, 0)
        ids, positions, mask, pad_lens = self.prepare_prefill(token_lists)
        cache = BatchCache.allocate(self.layout, pad_lens, 0, num_cols)
        self.run_model(ids, positions, mask, cache)
        cache.zero_padding()
        return cache

    # -- decode --------------------------------------------------------------------------------

    def prepare_decode(self, cache: BatchCache, last_tokens: list[int]):
        """Inputs of one decode step: each row's last token at its own next position."""
        dev = self.device
        ids = torch.tensor(last_tokens, dtype=torch.long, device=dev)[:, None]  # [B, 1]
        positions = torch.tensor(cache.row_lens(), dtype=torch.long, device=dev)[:, None]  # [B, 1]
        new_col = torch.ones((len(last_tokens), 1), dtype=torch.bool, device=dev)  # [B, 1]
        mask = torch.cat([cache.key_mask(), new_col], 1)[:, None, None, :]  # [B, 1, 1, T+1]
        return ids, positions, mask

    @torch.inference_mode()
    def decode(
        self, cache: BatchCache, last_tokens: list[int], growth_cols: int | None = None
    ) -> torch.Tensor:
        """One step: feed each row's last token; the cache grows by one column (when full, its
        buffers grow by ``growth_cols``, default kv_growth_cols). Returns the next-token
        logits [B, V] (float32)."""
        cache.reserve(1, self.kv_growth_cols if growth_cols is None else growth_cols)
        ids, positions, mask = self.prepare_decode(cache, last_tokens)
        return self.run_model(ids, positions, mask, cache)

    def run_model(self, ids, positions, mask, cache: BatchCache) -> torch.Tensor:
        """Forward ``ids`` [B, Q] at ``positions`` [B, Q] with a 4D bool mask [B, 1, Q, K]
        (True: attend); appends Q columns to ``cache``; returns last-position logits [B, V]."""
        started_at = time.perf_counter()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache.hf_cache(),
            use_cache=True,
            logits_to_keep=1,
        )
        cache.advance(ids.shape[1])
        logits = out.logits[:, -1, :].float()
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
