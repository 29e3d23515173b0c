"""Parked KV caches of requests between slices (keep mode), with exact byte accounting.

An entry holds one request's per-layer (k, v) tensors trimmed to its real length (no padding)
and the token ids they cover, so a later dispatch can check that the KV still matches its
context. Eviction frees the oldest entries first. (A host-memory tier will live here too.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ParkedKV:
    token_ids: tuple[int, ...]  # the tokens this KV covers (a context's token_ids[:-1])
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each [1, H, len, D]
    nbytes: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class KVStore:
    """Parked KV per request id, oldest first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, ParkedKV] = OrderedDict()
        self._parked_bytes = 0

    @property
    def parked_bytes(self) -> int:
        """Sum of the parked tensors' nbytes."""
        return self._parked_bytes

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def park(
        self,
        request_id: str,
        token_ids: list[int] | tuple[int, ...],
        layers: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> int:
        """Keep ``layers`` (covering ``token_ids``) for ``request_id``, replacing any older
        entry; returns the bytes parked."""
        self.drop(request_id)
        lengths = {t.shape[-2] for kv in layers for t in kv}
        if lengths != {len(token_ids)}:
            raise ValueError(f"KV of {request_id} covers {lengths} tokens, not {len(token_ids)}")
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        self._entries[request_id] = ParkedKV(tuple(token_ids), layers, nbytes)
        self._parked_bytes += nbytes
        return nbytes

    def take(self, request_id: str) -> ParkedKV | None:
        """Remove and return the entry of ``request_id`` (None if none is parked)."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._parked_bytes -= entry.nbytes
        return entry

    def drop(self, request_id: str) -> bool:
        """Free the entry of ``request_id``; True if there was one."""
        return self.take(request_id) is not None

    def evict_for(
        self, bytes_needed: int, protect: set[str] | frozenset[str] = frozenset()
    ) -> list[str]:
        """Free entries, oldest first and never those in ``protect``, until at least
        ``bytes_needed`` bytes were freed or nothing evictable is left; returns the evicted ids."""
        evicted: list[str] = []
        freed = 0
        for request_id in list(self._entries):
            if freed >= bytes_needed:
                break
            if request_id in protect:
                continue
            freed += self._entries[request_id].nbytes
            self.drop(request_id)
            evicted.append(request_id)
        return evicted

    def request_ids(self) -> list[str]:
        """Parked request ids, oldest first."""
        return list(self._entries)
