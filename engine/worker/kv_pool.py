"""The worker's paged KV cache: one preallocated pool of fixed-size blocks per layer, sized by the
KV budget, and the block tables of the sequences that own its blocks. The pool is the one owner
of every block: ``allocate`` / ``free`` are the only ways in and out.

Layout: per layer, keys and values of shape [kv_heads, num_blocks * block_tokens, head_dim]
(head-major), so that a run of consecutive blocks is a plain view that attention reads in place.
Allocation therefore prefers consecutive blocks (best fit, and extending a table's last run);
when the free blocks are scattered a table may span several runs, and attention gathers it.

Prefix cache: a full block whose KV is written may be named (engine/prefix_hash.py) with
``register``; a new sequence whose leading blocks carry names the pool knows shares them
(``share_prefix``: reference-counted, no copy). A block is in one of three states: in use (held
by one or more tables), cached (no table holds it, its name is known: reusable until the pool
needs the room, least recently used first), or free. Cached blocks count as free for every
caller: allocation takes truly free blocks first and then evicts cached ones, so the cache never
costs a request its room. A shared block is never written again: a sequence only writes past
its last full block.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_BLOCK_TOKENS = 16
Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each [1, H, len, D]


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(slots=True, eq=False)
class BlockTable:
    """The blocks of one sequence, in token order, and how many tokens of KV they hold."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def runs(self, block_tokens: int, num_tokens: int) -> list[tuple[int, int]]:
        """(first slot, length) of each run of consecutive slots covering ``num_tokens``."""
        out: list[tuple[int, int]] = []
        left = num_tokens
        for b in self.blocks:
            if left <= 0:
                break
            n = min(block_tokens, left)
            start = b * block_tokens
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((start, n))
            left -= n
        return out

    def slots(self, block_tokens: int, start: int, num: int) -> list[int]:
        """Slot indices of tokens ``start .. start + num - 1``."""
        return [
            self.blocks[t // block_tokens] * block_tokens + t % block_tokens
            for t in range(start, start + num)
        ]


class KVPool:
    """Blocks of ``block_tokens`` tokens of KV, as many as ``budget_bytes`` holds. Thread-safe
    allocation: the compute thread allocates and frees, the handoff thread frees what it sends."""

    def __init__(
        self,
        layout: KVLayout,
        budget_bytes: int,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        prefix_cache: bool = True,
    ) -> None:
        self.layout = layout
        self.block_tokens = block_tokens
        self.block_bytes = block_tokens * layout.bytes_per_token
        self.num_blocks = max(0, budget_bytes // self.block_bytes)
        shape = (layout.num_kv_heads, self.num_blocks * block_tokens, layout.head_dim)
        # torch.empty: on a CPU pages are committed when first written, so a large budget costs
        # nothing until used; on a GPU the whole pool is reserved up front, as the budget says.
        self.keys = [self._empty(shape) for _ in range(layout.num_layers)]
        self.values = [self._empty(shape) for _ in range(layout.num_layers)]
        self._free = np.ones(self.num_blocks, dtype=bool)  # held by no table and not cached
        self._num_free = self.num_blocks  # truly free blocks (cached ones not included)
        self._refs = np.zeros(self.num_blocks, dtype=np.int32)  # tables holding each block
        self.prefix_cache = prefix_cache
        self._name_of: dict[int, bytes] = {}  # block -> its name, for named blocks
        self._block_of: dict[bytes, int] = {}  # name -> block
        self._cached: OrderedDict[int, None] = OrderedDict()  # unheld named blocks, LRU first
        self._cached_at = np.zeros(self.num_blocks, dtype=np.float64)  # when it became cached
        self._clock = 0
        self._events: dict[bytes, bool] = {}  # name -> known, changed since take_events
        self._lock = threading.Lock()

    def _empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=self.layout.dtype, device=self.layout.device)

    # -- accounting ----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks a caller may allocate: free ones and cached ones (evicted on demand)."""
        return self._num_free + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Named blocks that no table holds (reusable by a sequence with the same prefix)."""
        return len(self._cached)

    @property
    def used_bytes(self) -> int:
        """Bytes of blocks held by tables: each shared block counts once; cached ones not."""
        return (self.num_blocks - self.num_free) * self.block_bytes

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def nbytes(self, table: BlockTable) -> int:
        return len(table.blocks) * self.block_bytes

    # -- allocate / free -----------------------------------------------------------------------

    def can_allocate(self, table: BlockTable, num_tokens: int) -> bool:
        """Whether ``table`` can grow to hold ``num_tokens`` tokens."""
        return self.blocks_for(num_tokens) - len(table.blocks) <= self._num_free

    def allocate(self, table: BlockTable, num_tokens: int) -> bool:
        """Grow ``table`` to hold ``num_tokens`` tokens (never shrinks it); False, with nothing
        allocated, when the pool has too few free blocks."""
        need = self.blocks_for(num_tokens) - len(table.blocks)
        if need <= 0:
            return True
        with self._lock:
            if need > self._num_free + len(self._cached):
                return False
            after = table.blocks[-1] + 1 if table.blocks else None
            new = self._take(need, after)
            self._free[new] = False
            self._refs[new] = 1
            self._num_free -= len(new)
        table.blocks.extend(int(b) for b in new)
        return True

    def free(self, table: BlockTable, keep_tokens: int = 0) -> None:
        """Let go of the blocks of ``table`` beyond those holding its first ``keep_tokens``: a
        block no other table holds becomes cached if it is named, else free."""
        keep = self.blocks_for(keep_tokens)
        if keep >= len(table.blocks):
            return
        gone = table.blocks[keep:]
        del table.blocks[keep:]
        table.num_tokens = min(table.num_tokens, keep_tokens)
        with self._lock:
            if (self._refs[gone] <= 0).any():
                raise RuntimeError(f"KV blocks freed twice: {gone}")
            # last block first: a chain's tail becomes cached before its head, so it is evicted
            # first (a head evicted first would leave the rest of its chain unreachable)
            for b in reversed(gone):
                self._refs[b] -= 1
                if self._refs[b] == 0:
                    if b in self._name_of:
                        self._cached[b] = None
                        self._clock += 1
                        self._cached_at[b] = self._clock
                    else:
                        self._free[b] = True
                        self._num_free += 1

    # -- prefix cache --------------------------------------------------------------------------

    def register(self, table: BlockTable, names: list[bytes], start: int = 0) -> None:
        """Name the table's blocks ``start .. len(names) - 1``, whose KV must be written (full
        blocks only). A block already named keeps its name; a name already given to another
        block (the same prefix computed twice) leaves this block unnamed, freed when released."""
        if not self.prefix_cache:
            return
        with self._lock:
            for b, name in zip(table.blocks[start:], names[start:], strict=False):
                if b in self._name_of or name in self._block_of:
                    continue
                self._name_of[b] = name
                self._block_of[name] = b
                self._events[name] = True

    def share_prefix(self, table: BlockTable, names: list[bytes]) -> int:
        """Give an empty table the longest run of leading blocks whose names are known (shared,
        no copy); returns the tokens of KV it now holds."""
        if not self.prefix_cache or table.blocks:
            return 0
        with self._lock:
            for name in names:
                b = self._block_of.get(name)
                if b is None:
                    break
                if self._refs[b] == 0:
                    del self._cached[b]
                self._refs[b] += 1
                table.blocks.append(b)
        table.num_tokens = len(table.blocks) * self.block_tokens
        return table.num_tokens

    def __contains__(self, name: bytes) -> bool:
        """Whether a block of this name is in the pool (in use or cached)."""
        return name in self._block_of

    def adopt_prefix(self, table: BlockTable, names: list[bytes]) -> int:
        """A table holding a whole number of blocks of KV, the next ones allocated but not yet
        written: replace those next blocks by named ones while the pool knows their names
        (shared, no copy; the table's own blocks go back); returns the tokens it now holds
        more. For a row that waited while another computed the same prefix."""
        bt = self.block_tokens
        if not self.prefix_cache or table.num_tokens % bt:
            return 0
        first = i = table.num_tokens // bt
        with self._lock:
            while i < min(len(names), len(table.blocks)):
                b = self._block_of.get(names[i])
                if b is None:
                    break
                own = table.blocks[i]
                if b != own:
                    if self._refs[b] == 0:
                        del self._cached[b]
                    self._refs[b] += 1
                    self._refs[own] -= 1  # never written, so never named: it is free now
                    if self._refs[own] == 0:
                        self._free[own] = True
                        self._num_free += 1
                    table.blocks[i] = b
                i += 1
        table.num_tokens += (i - first) * bt
        return (i - first) * bt

    def cached_prefix_blocks(self, names: list[bytes]) -> int:
        """How many leading blocks of these names the pool holds (in use or cached)."""
        n = 0
        for name in names:
            if name not in self._block_of:
                break
            n += 1
        return n

    def take_events(self) -> tuple[list[bytes], list[bytes]]:
        """Names that became known and names forgotten since the last call (net changes, for
        the broker's prefix index)."""
        with self._lock:
            events, self._events = self._events, {}
        return [n for n, known in events.items() if known], [
            n for n, known in events.items() if not known
        ]

    def clear_cache(self) -> None:
        """Forget every name (blocks in use stay in use; cached ones become free)."""
        with self._lock:
            self._evict_cached(len(self._cached))
            for b, name in list(self._name_of.items()):
                del self._name_of[b]
                del self._block_of[name]
                self._events[name] = False

    def _evict_cached(self, num: int) -> None:
        """Turn the ``num`` least recently used cached blocks into free ones (lock held)."""
        for _ in range(max(0, min(num, len(self._cached)))):
            self._evict(next(iter(self._cached)))

    def _evict(self, b: int) -> None:
        """A cached block becomes free: its name is forgotten (lock held)."""
        del self._cached[b]
        name = self._name_of.pop(b)
        del self._block_of[name]
        self._events[name] = False
        self._free[b] = True
        self._num_free += 1

    def _take(self, need: int, after: int | None) -> np.ndarray:
        """Block ids to allocate (lock held; free plus cached blocks hold ``need``): consecutive
        after ``after`` where free, then the smallest free run that holds the rest; else the
        run of unheld blocks (free or cached) whose cached ones were least recently used, its
        cached blocks evicted; else cached blocks evicted least recently used first and the
        first free blocks wherever they are. Evicting a run rather than the oldest blocks
        wherever they lie keeps tables in few runs, which attention reads in place."""
        taken: list[np.ndarray] = []
        if after is not None and after < self.num_blocks:
            stop = after
            while stop < self.num_blocks and stop - after < need and self._free[stop]:
                stop += 1
            if stop > after:
                taken.append(np.arange(after, stop))
                need -= stop - after
        if need > 0:
            free = self._free.copy()
            for t in taken:
                free[t] = False
            run = self._best_run(free, need)
            if run is None and self._cached:
                unheld = free | (self._refs == 0)
                for t in taken:
                    unheld[t] = False
                run = self._least_recent_run(unheld, need)
                if run is not None:
                    for b in run[~free[run]]:
                        self._evict(int(b))
            if run is None:
                self._evict_cached(need - int(free.sum()))
                free = self._free.copy()
                for t in taken:
                    free[t] = False
                run = np.flatnonzero(free)[:need]
            taken.append(run)
        return np.concatenate(taken)

    @staticmethod
    def _best_run(free: np.ndarray, need: int) -> np.ndarray | None:
        """The first ``need`` blocks of the smallest run of free blocks that holds them."""
        edges = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        lens = ends - starts
        fit = np.flatnonzero(lens >= need)
        if not len(fit):
            return None
        best = fit[np.argmin(lens[fit])]
        return np.arange(starts[best], starts[best] + need)

    def _least_recent_run(self, unheld: np.ndarray, need: int) -> np.ndarray | None:
        """``need`` consecutive unheld blocks whose cached ones became cached longest ago (the
        least sum of their times; free blocks count 0), or None when no such run exists."""
        if need > len(unheld):
            return None
        count = np.concatenate(([0], np.cumsum(unheld)))
        age = np.concatenate(([0.0], np.cumsum(np.where(self._free, 0.0, self._cached_at))))
        whole = np.flatnonzero(count[need:] - count[:-need] == need)
        if not len(whole):
            return None
        cost = age[whole + need] - age[whole]
        start = int(whole[np.argmin(cost)])
        return np.arange(start, start + need)

    # -- copies in and out ---------------------------------------------------------------------

    def read(self, table: BlockTable) -> Layers:
        """Copies of the table's KV, per layer (k, v) each [1, H, num_tokens, D]."""
        index = self.slot_index(table, 0, table.num_tokens)
        return [
            (k.index_select(1, index)[None], v.index_select(1, index)[None])
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def write(self, table: BlockTable, layers: Layers) -> None:
        """Fill an allocated table from per-layer (k, v) each [1, H, n, D]; it then holds n."""
        num_tokens = layers[0][0].shape[-2]
        index = self.slot_index(table, 0, num_tokens)
        for (k, v), kbuf, vbuf in zip(layers, self.keys, self.values, strict=True):
            kbuf.index_copy_(1, index, k[0].to(kbuf.device, kbuf.dtype))
            vbuf.index_copy_(1, index, v[0].to(vbuf.device, vbuf.dtype))
        table.num_tokens = num_tokens

    def slot_index(self, table: BlockTable, start: int, num: int) -> torch.Tensor:
        slots = table.slots(self.block_tokens, start, num)
        return torch.tensor(slots, dtype=torch.long, device=self.layout.device)
