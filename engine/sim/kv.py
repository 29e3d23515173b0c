"""A simulated worker's KV: block counts of its paged pool (no tensors) and its parked KV in two
tiers, with the real pool's and store's rules (engine/worker/kv_pool.py, kv_store.py): blocks
of ``block_tokens``, parked tables kept in place, eviction oldest first to the host tier when it
fits there and offloading pays, else dropped; the host tier drops its least recently used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Table:
    """A row's blocks (a count) and how many tokens its KV holds."""

    num_blocks: int = 0
    num_tokens: int = 0


class BlockPool:
    """Counts of the pool's blocks: ``allocate`` grows a table, ``free`` gives blocks back."""

    def __init__(self, budget_bytes: int, block_tokens: int, kv_bytes_per_token: int) -> None:
        self.block_tokens = block_tokens
        self.block_bytes = block_tokens * kv_bytes_per_token
        self.num_blocks = budget_bytes // self.block_bytes
        self.num_free = self.num_blocks

    @property
    def used_bytes(self) -> int:
        return (self.num_blocks - self.num_free) * self.block_bytes

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def allocate(self, table: Table, num_tokens: int) -> bool:
        """Grow ``table`` to hold ``num_tokens`` (never shrink it); False when too few are free."""
        need = self.blocks_for(num_tokens) - table.num_blocks
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        self.num_free -= need
        table.num_blocks += need
        return True

    def free(self, table: Table, keep_tokens: int = 0) -> None:
        keep = min(table.num_blocks, self.blocks_for(keep_tokens))
        self.num_free += table.num_blocks - keep
        table.num_blocks = keep


@dataclass(slots=True)
class Entry:
    """Parked KV of one request covering ``num_tokens`` tokens: blocks in the pool (``table``),
    or bytes held outside it (staged after a handoff, or in the host tier)."""

    num_tokens: int
    nbytes: int
    table: Table | None = None
    tier: str = "device"  # "device" | "host"
    handed_off: bool = False
    transfer_s: float = 0.0  # how long its handoff took (handed off only)


@dataclass(slots=True)
class Evicted:
    offloaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


class ParkedKV:
    """Parked KV per request id in the device and host tiers."""

    def __init__(
        self, pool: BlockPool, host_budget_bytes: int, offload_pays: Callable[[int, int], bool]
    ) -> None:
        self.pool = pool
        self.host_budget_bytes = host_budget_bytes
        self.offload_pays = offload_pays
        self._device: OrderedDict[str, Entry] = OrderedDict()  # oldest first
        self._host: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.host_bytes = 0
        self.staged_bytes = 0  # device entries outside the pool (handed off, not yet adopted)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._device or request_id in self._host

    @property
    def parked_bytes(self) -> int:
        return sum(e.nbytes for e in self._device.values())

    def park(self, request_id: str, entry: Entry) -> None:
        self.drop(request_id)
        self._device[request_id] = entry
        if entry.table is None:
            self.staged_bytes += entry.nbytes

    def take(self, request_id: str) -> Entry | None:
        """The entry, out of the store (the caller owns its blocks now)."""
        entry = self._device.pop(request_id, None)
        if entry is not None and entry.table is None:
            self.staged_bytes -= entry.nbytes
        if entry is None and (entry := self._host.pop(request_id, None)) is not None:
            self.host_bytes -= entry.nbytes
        return entry

    def drop(self, request_id: str) -> bool:
        entry = self.take(request_id)
        if entry is not None and entry.table is not None:
            self.pool.free(entry.table)
        return entry is not None

    def release(self, entry: Entry) -> None:
        """Free an entry taken out of the store (stale: it covered other tokens)."""
        if entry.table is not None:
            self.pool.free(entry.table)

    def evict_for(self, bytes_needed: int) -> Evicted:
        """Free device bytes, oldest entries first, until ``bytes_needed`` were freed or none is
        left: each goes to the host tier when it fits and offloading pays, else it is dropped."""
        out = Evicted()
        freed = 0
        for request_id in list(self._device):
            if freed >= bytes_needed:
                break
            entry = self.take(request_id)
            assert entry is not None
            freed += entry.nbytes
            self.release(entry)
            if entry.nbytes > self.host_budget_bytes or not self.offload_pays(
                entry.num_tokens, entry.nbytes
            ):
                out.dropped.append(request_id)
                continue
            while self.host_bytes + entry.nbytes > self.host_budget_bytes:
                lru_id, lru = self._host.popitem(last=False)
                self.host_bytes -= lru.nbytes
                out.dropped.append(lru_id)
            entry.table, entry.tier = None, "host"
            self._host[request_id] = entry
            self.host_bytes += entry.nbytes
            out.offloaded.append(request_id)
        return out
