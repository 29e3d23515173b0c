"""A simulated worker: the executor's contract (engine/worker/executor.py) without a model.

Same commands (``submit``, ``renew``, ``abort``, ``drop_kv``) and the same messages back
(Generated, Released, BatchDone, KVEvicted), with the executor's rules: joins admitted at the
next step, sequential batches once the running set is empty; blocks for a row's whole
reservation at admission (else for one step, growing a block at a time); parked KV adopted in
place, restored from the host tier, or handed off by a peer; chunked prefill at fixed offsets
within ``max_step_tokens`` per step; rows leave at eos/length/budget; the memory guard evicts
parked KV, then preempts the newest rows. A step lasts what the device model says; every
generated token is token id 1 (never an EOS: benchmarks ignore EOS).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import overload

from engine import protocol as p
from engine.prefix_hash import block_hashes, prefix_root
from engine.sim.devices import DeviceModel, StepShape
from engine.sim.kv import BlockPool, Entry, ParkedKV, Table
from engine.worker.dispatch import MAX_SAMPLES, DispatchStats, TokenStream

BLOCK_TOKENS = 16  # the worker's default (engine/worker/kv_pool.py)
MAX_STEP_TOKENS = 512  # engine/worker/executor.py: DEFAULT_STEP_TOKENS
PREFILL_CHUNK_TOKENS = 256  # DEFAULT_PREFILL_CHUNK_TOKENS
SIM_TOKEN = 1  # what a simulated row samples


@dataclass(slots=True)
class _Row:
    item: p.BatchItem
    batch_id: int
    context_len: int  # tokens of its context; grows by one per sampled token
    seq: int  # admission order: the memory guard preempts the newest first
    num_new: int = 0
    table: Table = field(default_factory=Table)
    pending: Entry | None = None  # reused KV held outside the pool until its blocks are written
    names: list[bytes] = field(default_factory=list)  # prefix-cache names of its full blocks
    num_named: int = 0  # of its leading blocks, those registered in the prefix cache
    cached_tokens: int = 0  # tokens of its context found in the prefix cache


class _Context(Sequence[int]):
    """A row's context as ``block_hashes`` reads it (its length, slices of it) without building
    it: the item's tokens, then the ``num_new`` tokens sampled since (all SIM_TOKEN)."""

    __slots__ = ("head", "num_new")

    def __init__(self, head: list[int], num_new: int) -> None:
        self.head, self.num_new = head, num_new

    def __len__(self) -> int:
        return len(self.head) + self.num_new

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        head = self.head
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                raise ValueError("a row's context is read in runs, not with a step")
            if hi <= len(head):
                return head[lo:hi]
            return head[lo:hi] + [SIM_TOKEN] * (hi - max(lo, len(head)))
        i = range(len(self))[index]
        return head[i] if i < len(head) else SIM_TOKEN


@dataclass(slots=True)
class _Out:
    released: list[p.Released] = field(default_factory=list)
    done: list[DispatchStats] = field(default_factory=list)
    offloaded: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        """Messages besides tokens wait to go out (tokens then go out before them)."""
        return bool(self.released or self.done or self.offloaded or self.evicted)


class SimWorker:
    """One simulated worker; the cluster calls ``start_step(now)`` when it is idle and has work,
    and ``end_step(now)`` at the time that call returned."""

    def __init__(
        self,
        worker_id: str,
        device: DeviceModel,
        peers: Callable[[str], SimWorker | None] = lambda worker_id: None,
        noise: float = 0.0,
        seed: int = 0,
        refine: bool = True,
        prefix_cache: bool = False,
        stream_interval: int = 1,
    ) -> None:
        self.worker_id = worker_id
        self.refine = refine  # report time samples (the broker refines its time model on them)
        self.device = device
        self.pool = BlockPool(
            device.kv_budget_bytes, BLOCK_TOKENS, device.kv_bytes_per_token, prefix_cache
        )
        # the names of full blocks chain from it (engine/prefix_hash.py); b"": no prefix cache
        self.prefix_root = (
            prefix_root(device.name, "simulated", BLOCK_TOKENS) if prefix_cache else b""
        )
        time, copy_rate = device.time_model, device.copy_bytes_per_s
        self.store = ParkedKV(
            self.pool,
            device.host_kv_budget_bytes,
            lambda num_tokens, nbytes: 2 * nbytes / copy_rate < time.row_prefill_s(num_tokens),
        )
        self._peers = peers
        self._rng = random.Random(seed) if noise > 0 else None
        self._noise = noise
        self._rows: list[_Row] = []
        self._joining: list[p.RunBatch] = []
        self._queued: deque[p.RunBatch] = deque()
        self._awaited: dict[str, float] = {}  # request id -> when its handed-off KV arrives
        self._in_flight: dict[str, Entry] = {}  # handed-off KV on its way here
        self._stats: dict[int, DispatchStats] = {}
        self._out = _Out()
        self._tokens = TokenStream(stream_interval)  # sampled, not yet sent
        self._seq = 0
        self._extra_s = 0.0  # restores written before this step
        self._step: tuple[float, list[tuple[_Row, int]], int, list[int]] | None = None
        self._inbox: list[p.RunBatch | p.Renew | p.Abort | p.DropKV] = []
        self.num_steps = 0
        # prefix-cache names of each live request's blocks, from its earlier admissions: a
        # context only grows, so its next admission hashes only the blocks after them
        self._names_of: dict[str, list[bytes]] = {}

    def forget(self, request_id: str) -> None:
        """The request ended: drop the names kept for it."""
        self._names_of.pop(request_id, None)

    def ready(self) -> p.Ready:
        d = self.device
        return p.Ready(
            version=p.PROTOCOL_VERSION, worker_id=self.worker_id, device=d.name,
            model=d.name, dtype="simulated", kv_bytes_per_token=d.kv_bytes_per_token,
            kv_budget_bytes=d.kv_budget_bytes, max_context_len=d.max_context_len,
            eos_token_ids=[0], mem_total_bytes=None, time_model=d.time_model.to_params(),
            peer_addr=self.worker_id, host_kv_budget_bytes=d.host_kv_budget_bytes,
            copy_bytes_per_s=d.copy_bytes_per_s, transfer_bytes_per_s=d.transfer_bytes_per_s,
            transfer_latency_s=d.transfer_latency_s, kv_block_tokens=BLOCK_TOKENS,
            prefix_root=self.prefix_root, stream_interval=self._tokens.interval,
        )  # fmt: skip

    # -- commands (between steps: one that arrives during a step waits for its end) -------------

    def command(self, msg: p.RunBatch | p.Renew | p.Abort | p.DropKV, now: float) -> None:
        if self._step is not None:
            self._inbox.append(msg)
            return
        if isinstance(msg, p.RunBatch):
            self.submit(msg, now)
        elif isinstance(msg, p.Renew):
            self.renew(msg.renewals)
        elif isinstance(msg, p.Abort):
            self.abort(msg.request_ids)
        elif isinstance(msg, p.DropKV):
            self.drop_kv(msg.request_ids)

    def submit(self, run: p.RunBatch, now: float) -> None:
        self._stats[run.batch_id] = DispatchStats(run.batch_id, num_open=len(run.items))
        for item in run.items:
            if item.kv_source:
                self._pull(item, now)
        (self._joining if run.join else self._queued).append(run)

    def _pull(self, item: p.BatchItem, now: float) -> None:
        """A handoff: the peer's parked KV arrives after latency + bytes / rate (then landed
        in the pool, ``_land``); gone there, the row recomputes."""
        peer = self._peers(item.kv_source)
        entry = peer.store.take(item.request_id) if peer is not None else None
        if entry is None or peer is None:
            return
        peer.store.release(entry)  # its blocks go back there: the KV travels as bytes
        if entry.num_tokens != len(item.token_ids) - 1:
            return  # stale: it covers other tokens
        d = self.device
        nbytes = entry.num_tokens * d.kv_bytes_per_token  # its tokens' KV, not whole blocks
        transfer_s = d.transfer_latency_s + nbytes / d.transfer_bytes_per_s
        self._awaited[item.request_id] = now + transfer_s
        arrived = Entry(entry.num_tokens, nbytes, handed_off=True, transfer_s=transfer_s)
        arrived.sent_bytes = nbytes
        self._in_flight[item.request_id] = arrived

    def _land(self, now: float) -> None:
        """Arrivals due by ``now`` (a step boundary, where the executor takes its commands) are
        parked in blocks of the pool, evicting parked KV that no dispatch waiting here needs,
        as the executor's ``_land``; one the pool has no room for waits outside it (staged)."""
        due = [rid for rid in self._in_flight if self._awaited.get(rid, 0.0) <= now]
        for request_id in due:
            entry = self._in_flight.pop(request_id)
            self.store.park(request_id, entry)  # staged, as the executor's intake parks it
            waiting = {it.request_id for run in (*self._joining, *self._queued) for it in run.items}
            need, table = self.pool.blocks_for(entry.num_tokens), Table()
            if need > self.pool.num_blocks or not self._free_blocks(need, waiting | {request_id}):
                continue
            if self.pool.allocate(table, entry.num_tokens):
                table.num_tokens = entry.num_tokens
                self.store.settle(request_id, table)

    def renew(self, renewals: list[tuple[str, int]]) -> None:
        budgets = dict(renewals)
        for run in (*self._joining, *self._queued):
            for item in run.items:
                if item.request_id in budgets:
                    item.max_steps = max(item.max_steps, budgets[item.request_id])
        for row in self._rows:
            if row.item.request_id in budgets:
                row.item.max_steps = max(row.item.max_steps, budgets[row.item.request_id])
                self.pool.allocate(row.table, self._reservation(row))

    def abort(self, request_ids: list[str]) -> None:
        ids = set(request_ids)
        for runs in (self._joining, self._queued):
            for run in list(runs):
                for item in [it for it in run.items if it.request_id in ids]:
                    self._release(run.batch_id, item.request_id, "aborted", 0, False)
                run.items = [it for it in run.items if it.request_id not in ids]
                if not run.items:
                    runs.remove(run)
        leaving = {i: "aborted" for i, r in enumerate(self._rows) if r.item.request_id in ids}
        if leaving:
            self._leave(leaving)  # type: ignore[arg-type]
        for request_id in ids:
            self._awaited.pop(request_id, None)
            self._in_flight.pop(request_id, None)
            self.store.drop(request_id)

    def drop_kv(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.store.drop(request_id)

    # -- state ----------------------------------------------------------------------------------

    @property
    def stepping(self) -> bool:
        return self._step is not None

    def next_wake_at(self, now: float) -> float | None:
        """When a step could start: now, the arrival of awaited KV, or None (no work)."""
        if self._rows:
            return now
        runs = self._joining or list(self._queued)[:1]
        if not runs:
            return None
        waits = [self._wait_until(run) for run in runs]
        return max(now, min(waits))

    def _wait_until(self, run: p.RunBatch) -> float:
        return max((self._awaited.get(it.request_id, 0.0) for it in run.items), default=0.0)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    # -- the step -------------------------------------------------------------------------------

    def start_step(self, now: float) -> float | None:
        """Admit what may start, guard memory, and begin one forward; returns when it ends
        (None: nothing runs)."""
        self._land(now)
        self._admit(now)
        self._adopt_computed()
        self._guard()
        if not self._rows:
            return None
        feeds = self._feeds()
        shape = StepShape(
            sum(1 for f in feeds if f == 1),
            sum(r.table.num_tokens + 1 for r, f in zip(self._rows, feeds, strict=True) if f == 1),
            [(r.table.num_tokens, f) for r, f in zip(self._rows, feeds, strict=True) if f > 1],
        )
        step_s = self.device.timer.step_s(shape) * self.device.slowdown
        if self.device.slowdown_trace is not None:
            step_s *= self.device.slowdown_trace.at(now)
        step_s += self._extra_s
        if self._rng is not None:
            step_s *= self._rng.lognormvariate(0.0, self._noise)
        self._extra_s = 0.0
        fed = [(r, f) for r, f in zip(self._rows, feeds, strict=True) if f]
        self._step = (step_s, fed, shape.num_decode, [f for f in feeds if f > 1])
        return now + step_s

    def end_step(self, now: float) -> list[p.Generated | p.Released | p.BatchDone | p.KVEvicted]:
        """The forward ended at ``now``: sample, release, and return the messages to send."""
        assert self._step is not None
        step_s, fed, num_decode, prefills = self._step
        self._step = None
        self.num_steps += 1
        decode_ctx = [r.table.num_tokens + 1 for r, f in fed if f == 1] if self.refine else []
        for row, num in fed:
            row.table.num_tokens += num
        if self.prefix_root:
            for row, _ in fed:
                if row.table.num_tokens // BLOCK_TOKENS > row.num_named:
                    self._register(row)
        used = self.pool.used_bytes + self.store.staged_bytes
        batch_ids = {r.batch_id for r in self._rows}
        all_stats = self._stats
        for batch_id in batch_ids:
            stats = all_stats[batch_id]
            stats.steps += 1
            stats.peak_bytes = max(stats.peak_bytes, used)
            if self.refine:
                self._time_sample(stats, decode_ctx, prefills, step_s)
        leaving: list[tuple[_Row, p.ReleaseReason]] = []
        stream = self._tokens
        for row, _ in fed:
            if row.table.num_tokens != row.context_len:
                continue  # mid-prefill: nothing sampled yet
            row.context_len += 1
            row.num_new += 1
            all_stats[row.batch_id].generated_tokens += 1
            stream.add(row.item.request_id, SIM_TOKEN, row.item.num_generated + row.num_new == 1)
            reason = self._finish_reason(row)
            if reason is not None:
                leaving.append((row, reason))
        stream.step()
        if leaving:
            index = {id(r): i for i, r in enumerate(self._rows)}
            self._leave({index[id(row)]: reason for row, reason in leaving})
        msgs = self.flush(now)
        inbox, self._inbox = self._inbox, []
        for msg in inbox:  # their releases go out before the next step
            self.command(msg, now)
        return msgs

    def _time_sample(
        self, stats: DispatchStats, decode_ctx: list[int], prefills: list[int], step_s: float
    ) -> None:
        n = len(decode_ctx)
        context_len = round(sum(decode_ctx) / n) if n else 0
        mean_len = round(sum(prefills) / len(prefills)) if prefills else 0
        if not prefills:
            stats.decode_samples.add((n, context_len, step_s))
        elif not decode_ctx:
            stats.prefill_samples.add((len(prefills), mean_len, step_s))
        elif len(stats.mixed_samples) < MAX_SAMPLES:
            stats.mixed_samples.append((n, context_len, len(prefills), mean_len, step_s))

    def _finish_reason(self, row: _Row) -> p.ReleaseReason | None:
        if row.num_new >= row.item.max_new_tokens or row.context_len >= self.device.max_context_len:
            return "length"
        if row.num_new >= row.item.max_steps:
            return "budget"
        return None

    def flush(self, now: float) -> list[p.Generated | p.Released | p.BatchDone | p.KVEvicted]:
        """The messages of the last step and of commands since, in the executor's order."""
        out, self._out = self._out, _Out()
        msgs: list[p.Generated | p.Released | p.BatchDone | p.KVEvicted] = []
        generated = self._tokens.take(force=out.pending or not self._rows)
        if generated is not None:
            msgs.append(generated)
        stored, removed = self.pool.take_events()
        if stored or removed:
            msgs.append(p.BlockEvents(stored=stored, removed=removed))
        msgs += out.released
        if out.offloaded:
            msgs.append(p.KVEvicted(request_ids=out.offloaded, offloaded=True))
        if out.evicted:
            msgs.append(p.KVEvicted(request_ids=out.evicted, offloaded=False))
        msgs += [stats.done(now) for stats in out.done]
        return msgs

    # -- admission and memory (the executor's rules) --------------------------------------------

    def _admit(self, now: float) -> None:
        if self._joining:
            runs = [r for r in self._joining if self._wait_until(r) <= now]
            self._joining = [r for r in self._joining if self._wait_until(r) > now]
        elif not self._rows and self._queued and self._wait_until(self._queued[0]) <= now:
            runs = [self._queued.popleft()]
        else:
            return
        cands: list[_Row] = []
        for run in runs:
            stats = self._stats[run.batch_id]
            stats.started_at = now if stats.started_at is None else stats.started_at
            for item in run.items:
                self._awaited.pop(item.request_id, None)
                cands.append(self._candidate(run.batch_id, item, stats))
        self._start(self._make_room(cands))

    def _candidate(self, batch_id: int, item: p.BatchItem, stats: DispatchStats) -> _Row:
        row = _Row(item, batch_id, len(item.token_ids), self._seq)
        self._seq += 1
        entry = self.store.take(item.request_id)
        if entry is not None and entry.num_tokens != row.context_len - 1:
            self.store.release(entry)  # stale: it covers other tokens
            entry = None
        if entry is None:
            if self.prefix_root:  # shares the leading blocks the prefix cache holds, if any
                context = row.context_len - 1
                row.names = self._names(row, context // BLOCK_TOKENS)
                row.cached_tokens = self.pool.share_prefix(row.table, row.names)
                row.num_named = row.table.num_blocks
                stats.prefix_query_tokens += context
                stats.prefix_hit_tokens += row.cached_tokens
            return row
        stats.reused_kv_tokens += entry.num_tokens
        if entry.handed_off:
            stats.handoff_tokens += entry.num_tokens
            stats.handoff_bytes += entry.sent_bytes
            stats.transfer_samples.append((entry.sent_bytes, entry.transfer_s))
        if entry.table is not None:
            row.table = entry.table  # parked or landed here: adopted in place
        else:
            row.pending = entry
            if not entry.handed_off:
                copy_s = entry.nbytes / self.device.copy_bytes_per_s
                stats.restored_tokens += entry.num_tokens
                stats.copy_samples.append((entry.nbytes, copy_s))
                self._extra_s += copy_s
        return row

    def _steps_left(self, row: _Row) -> int:
        item = row.item
        left = min(item.max_steps, item.max_new_tokens) - row.num_new
        return max(1, min(left, self.device.max_context_len - row.context_len))

    def _reservation(self, row: _Row) -> int:
        return row.context_len - 1 + self._steps_left(row)

    def _free_blocks(
        self, num_blocks: int, protect: set[str] | frozenset[str] = frozenset()
    ) -> bool:
        while self.pool.num_free < num_blocks:
            missing = (num_blocks - self.pool.num_free) * self.pool.block_bytes
            moved = self.store.evict_for(missing, protect)
            if not (moved.offloaded or moved.dropped):
                return False
            self._out.offloaded += moved.offloaded
            self._out.evicted += moved.dropped
        return True

    def _blocks_for_next_step(self) -> int:
        pool = self.pool
        return sum(max(0, pool.blocks_for(r.context_len) - r.table.num_blocks) for r in self._rows)

    def _make_room(self, cands: list[_Row]) -> list[_Row]:
        pool = self.pool
        for row in [r for r in cands if pool.blocks_for(r.context_len) > pool.num_blocks]:
            cands.remove(row)
            self._drop_row(row, "error", "the request does not fit this worker's KV budget")
        wanted = sum(pool.blocks_for(self._reservation(r)) - r.table.num_blocks for r in cands)
        self._free_blocks(wanted + self._blocks_for_next_step())
        started = []
        for row in cands:
            if pool.allocate(row.table, self._reservation(row)):
                started.append(row)
            elif self._free_blocks(pool.blocks_for(row.context_len)) and pool.allocate(
                row.table, row.context_len
            ):
                started.append(row)
            else:
                self._drop_row(row, "preempted", "")
        return started

    def _drop_row(self, row: _Row, reason: p.ReleaseReason, message: str) -> None:
        self.pool.free(row.table)
        self._release(row.batch_id, row.item.request_id, reason, 0, False, message)

    def _start(self, cands: list[_Row]) -> None:
        for row in cands:
            if row.pending is not None:
                row.table.num_tokens = row.pending.num_tokens
                row.pending = None
                if self.prefix_root:
                    self._register(row)
            elif row.table.num_tokens < row.context_len - 1:
                self._count_prefill(row)
        self._rows += cands

    def _count_prefill(self, row: _Row, sign: int = 1) -> None:
        """Count (sign -1: uncount) what is left to prefill of the row's context."""
        stats = self._stats[row.batch_id]
        todo = row.context_len - 1 - row.table.num_tokens
        stats.prefill_tokens += sign * todo
        stats.recomputed_tokens += sign * max(0, min(row.item.num_generated - 1, todo))

    # -- the prefix cache (the executor's rules) ------------------------------------------------

    def _names(self, row: _Row, num_blocks: int) -> list[bytes]:
        """Prefix-cache names of the row's first ``num_blocks`` full blocks."""
        request_id = row.item.request_id
        known = row.names or self._names_of.get(request_id, [])
        head = row.item.token_ids
        context = head if num_blocks * BLOCK_TOKENS <= len(head) else _Context(head, row.num_new)
        names = block_hashes(context, BLOCK_TOKENS, self.prefix_root, num_blocks, known)
        if len(names) > len(known):
            self._names_of[request_id] = names
        return names

    def _register(self, row: _Row) -> None:
        """Name the row's blocks that became full (their KV written) in the prefix cache."""
        full = row.table.num_tokens // BLOCK_TOKENS
        if full > row.num_named:
            if full > len(row.names):
                row.names = self._names(row, full)
            self.pool.register(row.table, row.names[:full], row.num_named)
            row.num_named = full

    def _adopt_computed(self) -> None:
        """Rows being prefilled that waited for a block an older row computed take the named
        blocks that now continue their context instead of computing them."""
        if not self.prefix_root:
            return
        for row in self._rows:
            table = row.table
            nxt = table.num_tokens // BLOCK_TOKENS
            if (
                table.num_tokens % BLOCK_TOKENS
                or nxt >= len(row.names)
                or row.names[nxt] not in self.pool
            ):
                continue  # mid-block, no named block next, or none known
            self._count_prefill(row, -1)
            adopted = self.pool.adopt_prefix(table, row.names)
            self._count_prefill(row)
            row.cached_tokens += adopted
            row.num_named = max(row.num_named, table.num_tokens // BLOCK_TOKENS)
            self._stats[row.batch_id].prefix_hit_tokens += adopted

    def _feeds(self) -> list[int]:
        """Tokens each row feeds this step (the executor's ``_feeds``, as counts)."""
        todos = [r.context_len - r.table.num_tokens for r in self._rows]
        room = MAX_STEP_TOKENS - sum(1 for t in todos if t <= 1)
        feeds, first = [], True
        computing: set[bytes] = set()  # names of the blocks this step's prefills complete
        bt = BLOCK_TOKENS
        for row, todo in zip(self._rows, todos, strict=True):
            if todo <= 1:
                feeds.append(todo)
                continue
            start = row.table.num_tokens
            if start % bt == 0 and start // bt < len(row.names):
                if row.names[start // bt] in computing:  # an older row computes it now:
                    feeds.append(0)  # take it next step (``_adopt_computed``), not twice
                    continue
            take = min(todo, PREFILL_CHUNK_TOKENS - start % PREFILL_CHUNK_TOKENS)
            if first or take <= room:
                feeds.append(take)
                room -= take
                first = False
                computing.update(row.names[start // bt : (start + take) // bt])
            else:
                feeds.append(0)
        return feeds

    def _guard(self) -> None:
        while self._rows:
            need = self._blocks_for_next_step()
            if self._free_blocks(need):
                if need:  # else every row's table holds its next token already
                    for row in self._rows:
                        self.pool.allocate(row.table, row.context_len)
                return
            newest = max(range(len(self._rows)), key=lambda i: self._rows[i].seq)
            self._leave({newest: "error" if len(self._rows) == 1 else "preempted"})

    def _leave(self, leaving: dict[int, p.ReleaseReason]) -> None:
        for i, reason in sorted(leaving.items()):
            row = self._rows[i]
            kept = reason == "budget" and row.item.keep_kv
            if kept:
                self.pool.free(row.table, keep_tokens=row.table.num_tokens)
                entry = Entry(row.table.num_tokens, row.table.num_blocks * self.pool.block_bytes)
                entry.table = row.table
                self.store.park(row.item.request_id, entry)
            else:
                self.pool.free(row.table)
            self._release(
                row.batch_id, row.item.request_id, reason, row.num_new, kept, "", row.cached_tokens
            )
        self._rows = [r for i, r in enumerate(self._rows) if i not in leaving]

    def _release(
        self,
        batch_id: int,
        request_id: str,
        reason: p.ReleaseReason,
        num_generated: int,
        kv_kept: bool,
        message: str = "",
        cached_tokens: int = 0,
    ) -> None:
        self._out.released.append(p.Released(
            batch_id=batch_id, request_id=request_id, reason=reason,
            num_generated=num_generated, kv_kept=kv_kept, message=message,
            cached_tokens=cached_tokens,
        ))  # fmt: skip
        stats = self._stats[batch_id]
        stats.num_open -= 1
        if stats.num_open == 0:
            self._out.done.append(self._stats.pop(batch_id))
