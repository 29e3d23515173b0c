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
    """A row's blocks (a count) and how many tokens its KV holds; ``named``: its blocks that
    carry a prefix-cache name, by position (each one pool block, perhaps shared by others)."""

    num_blocks: int = 0
    num_tokens: int = 0
    named: dict[int, bytes] = field(default_factory=dict)


class BlockPool:
    """Counts of the pool's blocks: ``allocate`` grows a table, ``free`` gives blocks back.

    With the prefix cache (engine/worker/kv_pool.py's rules, by block name rather than block
    id): a full block whose KV is written may be named (``register``); a new table takes the
    longest run of leading blocks whose names the pool knows (``share_prefix``, reference
    counted); a named block no table holds is cached, counted as free, and evicted least
    recently cached first when allocation needs it. The real pool may also evict a cached block
    to keep a table's blocks consecutive; block positions are not simulated, so here a cached
    block goes only when the free ones run out."""

    def __init__(
        self,
        budget_bytes: int,
        block_tokens: int,
        kv_bytes_per_token: int,
        prefix_cache: bool = False,
    ) -> None:
        self.block_tokens = block_tokens
        self.block_bytes = block_tokens * kv_bytes_per_token
        self.num_blocks = budget_bytes // self.block_bytes
        self._free = self.num_blocks  # held by no table and not cached
        self.prefix_cache = prefix_cache
        self._refs: dict[bytes, int] = {}  # named block -> tables holding it (0: cached)
        self._cached: OrderedDict[bytes, None] = OrderedDict()  # unheld named blocks, LRU first
        self._events: dict[bytes, bool] = {}  # name -> known, changed since take_events

    @property
    def num_free(self) -> int:
        """Blocks a caller may allocate: free ones and cached ones (evicted on demand)."""
        return self._free + len(self._cached)

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
        if need > self._free + len(self._cached):
            return False
        while need > self._free:
            self._evict(next(iter(self._cached)))
        self._free -= need
        table.num_blocks += need
        return True

    def free(self, table: Table, keep_tokens: int = 0) -> None:
        """Let go of the blocks beyond those holding the first ``keep_tokens``: a named block
        no other table holds becomes cached (the last first, as in the real pool), else free."""
        keep = min(table.num_blocks, self.blocks_for(keep_tokens))
        named = table.named
        if named:
            for i in range(table.num_blocks - 1, keep - 1, -1):
                name = named.pop(i, None)
                if name is None:
                    self._free += 1
                    continue
                self._refs[name] -= 1
                if self._refs[name] == 0:
                    self._cached[name] = None
        else:
            self._free += table.num_blocks - keep
        table.num_blocks = keep

    # -- prefix cache --------------------------------------------------------------------------

    def register(self, table: Table, names: list[bytes], start: int = 0) -> None:
        """Name the table's blocks ``start .. len(names) - 1`` (full, their KV written); a
        block named already keeps its name, a name another block has leaves this one unnamed."""
        if not self.prefix_cache:
            return
        for i in range(start, min(len(names), table.num_blocks)):
            name = names[i]
            if i in table.named or name in self._refs:
                continue
            table.named[i] = name
            self._refs[name] = 1
            self._events[name] = True

    def share_prefix(self, table: Table, names: list[bytes]) -> int:
        """Give an empty table the longest run of leading blocks whose names are known;
        returns the tokens of KV it now holds."""
        if not self.prefix_cache or table.num_blocks:
            return 0
        for i, name in enumerate(names):
            refs = self._refs.get(name)
            if refs is None:
                break
            if refs == 0:
                del self._cached[name]
            self._refs[name] = refs + 1
            table.named[i] = name
            table.num_blocks = i + 1
        table.num_tokens = table.num_blocks * self.block_tokens
        return table.num_tokens

    def __contains__(self, name: bytes) -> bool:
        return name in self._refs

    def adopt_prefix(self, table: Table, names: list[bytes]) -> int:
        """A table holding whole blocks of KV, its next ones allocated but not written: take the
        named blocks that continue it instead, its own going back; the tokens it gained."""
        bt = self.block_tokens
        if not self.prefix_cache or table.num_tokens % bt:
            return 0
        first = i = table.num_tokens // bt
        while i < min(len(names), table.num_blocks):
            name = names[i]
            refs = self._refs.get(name)
            if refs is None:
                break
            if table.named.get(i) != name:  # its own block was never written, so never named
                if refs == 0:
                    del self._cached[name]
                self._refs[name] = refs + 1
                table.named[i] = name
                self._free += 1
            i += 1
        table.num_tokens += (i - first) * bt
        return (i - first) * bt

    def take_events(self) -> tuple[list[bytes], list[bytes]]:
        """Names that became known and names forgotten since the last call (net changes)."""
        events, self._events = self._events, {}
        return [n for n, known in events.items() if known], [
            n for n, known in events.items() if not known
        ]

    def _evict(self, name: bytes) -> None:
        """A cached block becomes free: its name is forgotten."""
        del self._cached[name]
        del self._refs[name]
        self._events[name] = False
        self._free += 1


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
    sent_bytes: int = 0  # what its handoff moved (handed off only)


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

    def settle(self, request_id: str, table: Table) -> None:
        """A staged entry of ``request_id`` now lives in ``table``'s blocks."""
        entry = self._device[request_id]
        assert entry.table is None
        self.staged_bytes -= entry.nbytes
        entry.table, entry.nbytes = table, table.num_blocks * self.pool.block_bytes

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

    def evict_for(
        self, bytes_needed: int, protect: set[str] | frozenset[str] = frozenset()
    ) -> Evicted:
        """Free device bytes, oldest entries first and never those in ``protect``, until
        ``bytes_needed`` were freed or none is left: each goes to the host tier when it fits
        and offloading pays, else it is dropped."""
        out = Evicted()
        freed = 0
        for request_id in list(self._device):
            if freed >= bytes_needed:
                break
            if request_id in protect:
                continue
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
