"""Parked KV caches of requests between slices, in two tiers with exact byte accounting: on the
device (counted against the KV budget) and offloaded to host memory (its own budget; pinned on a
GPU). A request whose KV is in neither tier is gone and must be recomputed.

A device entry parked by this worker stays where it was computed: its blocks of the paged pool
(engine/worker/kv_pool.py), no copy. A handed-off arrival waits as tensors (``staged``) until its
batch writes it into blocks. Offloading reads an entry's blocks out and frees them.

Thread-safe: the compute thread parks, takes and evicts; the handoff thread takes entries that a
peer pulls. Device entries are evicted oldest first; host entries least recently used first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.worker.kv_pool import BlockTable, KVPool, Layers

Tier = Literal["device", "host"]


@dataclass(slots=True)
class ParkedKV:
    token_ids: tuple[int, ...]  # the tokens this KV covers (a context's token_ids[:-1])
    layers: Layers | None  # tensors (a staged arrival, or the host tier); None: in ``table``
    nbytes: int
    tier: Tier = "device"
    peer: str = ""  # the peer address it was handed off from ("": computed here)
    transfer: tuple[int, float] | None = None  # (bytes, seconds) of that handoff
    table: BlockTable | None = None  # its blocks in the pool (device tier, parked here)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class Evicted:
    """What ``evict_for`` did: moved to the host tier, or freed (those must recompute)."""

    offloaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.offloaded or self.dropped)


def layers_nbytes(layers: Layers) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers)


def to_host(layers: Layers, pin: bool) -> Layers:
    """Host copies of device tensors (pinned if asked); CPU tensors are returned as they are:
    on a CPU worker the host tier is a separate budget, not a separate memory."""

    def one(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        return out.copy_(t)

    return [(one(k), one(v)) for k, v in layers]


def to_device(layers: Layers, device: torch.device) -> Layers:
    return [(k.to(device), v.to(device)) for k, v in layers]


class KVStore:
    """Parked KV per request id in two tiers. ``offload_pays(num_tokens, nbytes)`` says whether
    moving an evicted entry to the host (and back later) beats recomputing it."""

    def __init__(
        self,
        host_budget_bytes: int = 0,
        pin_memory: bool = False,
        offload_pays: Callable[[int, int], bool] = lambda num_tokens, nbytes: True,
    ) -> None:
        self.host_budget_bytes = host_budget_bytes
        self.pin_memory = pin_memory
        self.offload_pays = offload_pays
        self.pool: KVPool | None = None  # the executor's pool, that device entries' blocks are in
        self._staged_bytes = 0  # device entries held as tensors (handed-off arrivals)
        self._device: OrderedDict[str, ParkedKV] = OrderedDict()  # oldest parked first
        self._host: OrderedDict[str, ParkedKV] = OrderedDict()  # least recently used first
        self._device_bytes = 0
        self._host_bytes = 0
        self._lock = threading.RLock()

    # -- accounting ----------------------------------------------------------------------------

    @property
    def parked_bytes(self) -> int:
        """Bytes of the device tier (they count against the KV budget)."""
        return self._device_bytes

    @property
    def staged_bytes(self) -> int:
        """Bytes of device entries outside the pool (arrivals not yet written into blocks)."""
        return self._staged_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes of the host tier (they count against ``host_budget_bytes``)."""
        return self._host_bytes

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._device or request_id in self._host

    def __len__(self) -> int:
        with self._lock:
            return len(self._device) + len(self._host)

    def tier_of(self, request_id: str) -> Tier | None:
        with self._lock:
            if request_id in self._device:
                return "device"
            return "host" if request_id in self._host else None

    def request_ids(self, tier: Tier = "device") -> list[str]:
        """Request ids of one tier, in eviction order."""
        with self._lock:
            return list(self._device if tier == "device" else self._host)

    # -- park, take, drop ----------------------------------------------------------------------

    def park(
        self,
        request_id: str,
        token_ids: list[int] | tuple[int, ...],
        layers: Layers,
        peer: str = "",
        transfer: tuple[int, float] | None = None,
    ) -> int:
        """Keep ``layers`` (covering ``token_ids``) on the device for ``request_id``, replacing
        any older entry; returns the bytes parked."""
        lengths = {t.shape[-2] for kv in layers for t in kv}
        if lengths != {len(token_ids)}:
            raise ValueError(f"KV of {request_id} covers {lengths} tokens, not {len(token_ids)}")
        entry = ParkedKV(tuple(token_ids), layers, layers_nbytes(layers), "device", peer, transfer)
        self._put(request_id, entry)
        return entry.nbytes

    def park_table(
        self, request_id: str, token_ids: list[int] | tuple[int, ...], table: BlockTable
    ) -> int:
        """Keep ``table``'s blocks in the pool (no copy) for ``request_id``; the store owns them
        from now on. Returns the bytes parked."""
        if self.pool is None or table.num_tokens != len(token_ids):
            raise ValueError(
                f"KV of {request_id} covers {table.num_tokens} tokens, not {len(token_ids)}"
            )
        entry = ParkedKV(tuple(token_ids), None, self.pool.nbytes(table), "device", table=table)
        self._put(request_id, entry)
        return entry.nbytes

    def _put(self, request_id: str, entry: ParkedKV) -> None:
        with self._lock:
            self._release(self._pop(request_id))
            self._device[request_id] = entry
            self._device_bytes += entry.nbytes
            self._staged_bytes += entry.nbytes if entry.table is None else 0

    def settle(self, request_id: str, table: BlockTable) -> bool:
        """Move a staged arrival of ``request_id`` into ``table`` (blocks allocated for it):
        its tensors are written there, then dropped. False if it has no staged entry."""
        assert self.pool is not None
        with self._lock:
            entry = self._device.get(request_id)
            if entry is None or entry.table is not None or entry.layers is None:
                return False
            self.pool.write(table, entry.layers)
            self._staged_bytes -= entry.nbytes
            self._device_bytes -= entry.nbytes
            entry.layers, entry.table = None, table
            entry.nbytes = self.pool.nbytes(table)
            self._device_bytes += entry.nbytes
            return True

    def take(self, request_id: str) -> ParkedKV | None:
        """Remove and return the entry of ``request_id`` from either tier (None if none); the
        caller owns it, blocks included."""
        with self._lock:
            return self._pop(request_id)

    def take_layers(self, request_id: str) -> ParkedKV | None:
        """``take``, with an entry in the pool read out into tensors and its blocks freed (what
        a peer pulls)."""
        entry = self.take(request_id)
        if entry is not None and entry.table is not None:
            self._to_tensors(entry)
        return entry

    def drop(self, request_id: str) -> bool:
        """Free the entry of ``request_id``; True if there was one."""
        with self._lock:
            entry = self._pop(request_id)
            self._release(entry)
        return entry is not None

    def free(self, entry: ParkedKV) -> None:
        """Free the blocks of an entry taken out of the store (not used after all)."""
        self._release(entry)

    def _release(self, entry: ParkedKV | None) -> None:
        if entry is not None and entry.table is not None and self.pool is not None:
            self.pool.free(entry.table)
            entry.table = None

    def _to_tensors(self, entry: ParkedKV) -> None:
        assert entry.table is not None and self.pool is not None
        entry.layers = self.pool.read(entry.table)
        entry.nbytes = layers_nbytes(entry.layers)
        self._release(entry)

    def _pop(self, request_id: str) -> ParkedKV | None:
        entry = self._device.pop(request_id, None)
        if entry is not None:
            self._device_bytes -= entry.nbytes
            self._staged_bytes -= entry.nbytes if entry.table is None else 0
            return entry
        entry = self._host.pop(request_id, None)
        if entry is not None:
            self._host_bytes -= entry.nbytes
        return entry

    # -- tiers ---------------------------------------------------------------------------------

    def offload(self, request_id: str) -> Evicted:
        """Move one device entry to the host tier, evicting least recently used host entries
        to make room; an entry the host cannot take is dropped. Returns what happened."""
        with self._lock:
            entry = self._device.get(request_id)
            if entry is None:
                return Evicted()
            return self._offload(request_id, entry)

    def _offload(self, request_id: str, entry: ParkedKV) -> Evicted:
        out = Evicted()
        self._pop(request_id)
        if entry.nbytes > self.host_budget_bytes or not self.offload_pays(
            entry.num_tokens, entry.nbytes
        ):
            self._release(entry)
            out.dropped.append(request_id)
            return out
        if entry.table is not None:
            self._to_tensors(entry)
        while self._host_bytes + entry.nbytes > self.host_budget_bytes:
            lru_id, lru = self._host.popitem(last=False)
            self._host_bytes -= lru.nbytes
            out.dropped.append(lru_id)
        entry.layers = to_host(entry.layers, self.pin_memory)
        entry.tier = "host"
        self._host[request_id] = entry
        self._host_bytes += entry.nbytes
        out.offloaded.append(request_id)
        return out

    def evict_for(
        self, bytes_needed: int, protect: set[str] | frozenset[str] = frozenset()
    ) -> Evicted:
        """Free device bytes, oldest entries first and never those in ``protect``, until at least
        ``bytes_needed`` were freed or no device entry is left: each goes to the host tier when
        it fits there and offloading pays, else it is dropped (gone: recompute)."""
        out = Evicted()
        freed = 0
        with self._lock:
            for request_id in list(self._device):
                if freed >= bytes_needed:
                    break
                if request_id in protect:
                    continue
                entry = self._device[request_id]
                freed += entry.nbytes
                one = self._offload(request_id, entry)
                out.offloaded += one.offloaded
                out.dropped += one.dropped
        return out
