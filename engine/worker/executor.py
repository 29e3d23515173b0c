"""The worker's loop logic for every policy: admission, batched decode steps, releases, memory.

No I/O and no threads: the ZeroMQ loop (engine/worker/worker.py) calls ``submit``, ``abort``,
``drop_kv`` and ``receive_kv`` between steps and ``step()`` while ``has_work()`` (waiting
``wait_s()`` for commands while a batch awaits handed-off KV); each StepResult holds the
protocol messages to send, in order: generated tokens, releases, KV moved to the host tier,
KV evicted, finished batches.

Semantics (the contract the broker plans against):

- A RunBatch with ``join=True`` is admitted into the running set at the next step (ILS). One
  with ``join=False`` waits, in FIFO order, until the running set is empty and no join is
  waiting; then all its items start together (SLS, SCLS).
- Row invariant: a row's KV covers ``token_ids[:-1]``; every step feeds each row's last token
  and samples one new token. A new row is prefilled with ``token_ids[:-1]`` unless KV parked
  here (device or host tier) covers exactly that (then it is reused: blocks parked in the pool
  are adopted as they are). Items that name a peer (``kv_source``) start once their handed-off
  KV arrived or failed: a sequential batch as a whole, a join on its own.
- KV lives in one paged pool sized by the budget (engine/worker/kv_pool.py). A row is given
  blocks for its whole dispatch at admission (context + its steps: its slice reservation) when
  the pool has them, else for one step, growing a block at a time. Rows of any lengths share a
  step with no padding.
- A row leaves with "eos" (sampled an EOS id and not ``ignore_eos``; the EOS token is reported
  in Generated), "length" (``max_new_tokens`` reached, or the context reached the model's
  maximum), "budget" (``max_steps`` of this dispatch used; with ``keep_kv`` its KV is parked and
  ``kv_kept`` is True), "aborted", "preempted" (memory guard) or "error" (bad input).
- Memory guard, always on: before rows start, parked KV of other requests is evicted (oldest
  first) until their reservations fit; before every step, if a row needs a new block and none
  is free, parked KV is evicted, then the newest admitted rows are preempted. Evicted KV goes to
  the host tier where it fits and pays (StepResult.offloaded), else it is gone
  (StepResult.evicted: those requests recompute). A policy whose reservations fit the budget
  (SCLS, reserve ILS, SLS) never sees a preemption.
- One forward per step, ragged: each running row feeds its last token; a row without KV is
  prefilled in the same forwards, in chunks of ``prefill_chunk_tokens`` at fixed offsets,
  within ``max_step_tokens`` per step (chunked prefill: a long prompt never stalls the running
  rows for long); it samples its first token in the step that feeds the end of its context.
- BatchDone per dispatch when its last request left. Counters (tokens): ``prefill_tokens`` all
  prefilled tokens; ``pad_tokens`` is always 0 (ragged forwards pad nothing); ``recomputed_tokens`` prefilled
  tokens that the request had generated before (``max(0, num_generated - 1)`` per prefilled row:
  its last token is fed by the decode step, not prefilled); ``reused_kv_tokens`` tokens covered
  by reused parked KV (``handoff_tokens`` of them handed off by a peer, ``restored_tokens``
  restored from the host tier); ``invalid_tokens`` is always 0 (finished rows leave at once).
  ``measured_peak_bytes``: max over its steps of the pool's allocated blocks (live and parked)
  plus staged arrivals. Time samples: prefill (rows, mean length, s), decode (rows, mean
  context after the step, s).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine import protocol as p
from engine.prefix_hash import block_hashes, prefix_root
from engine.worker.dispatch import (
    MAX_SAMPLES,
    DispatchStats,
    TokenStream,
    check_item,
    too_big,
)
from engine.worker.kv_pool import DEFAULT_BLOCK_TOKENS, BlockTable
from engine.worker.kv_reuse import KVArrived, KVFetchFailed, KVIntake
from engine.worker.kv_store import KVStore, ParkedKV
from engine.worker.runner import Runner, SamplingParams

# Tokens one step feeds at most: rows' last tokens plus chunks of prompts being prefilled. On
# this CPU 512 tokens take about a second; a GPU takes several thousand in the time of a step.
DEFAULT_STEP_TOKENS = 512
DEFAULT_PREFILL_CHUNK_TOKENS = 256


@dataclass(slots=True)
class StepResult:
    """Messages to send after a step, in this order."""

    generated: p.Generated | None = None  # tokens sampled since the last one (TokenStream)
    released: list[p.Released] = field(default_factory=list)
    done: list[p.BatchDone] = field(default_factory=list)
    offloaded: list[str] = field(default_factory=list)  # parked KV moved to the host tier
    evicted: list[str] = field(default_factory=list)  # parked KV freed: these must recompute
    blocks: p.BlockEvents | None = None  # prefix-cache blocks named and forgotten

    @property
    def pending(self) -> bool:
        """Messages besides tokens wait to go out (tokens then go out before them)."""
        return bool(self.released or self.done or self.offloaded or self.evicted)


@dataclass(slots=True)
class _Row:
    item: p.BatchItem
    batch_id: int
    token_ids: list[int]  # the whole context; grows by one token per step
    params: SamplingParams
    seq: int  # admission order: the memory guard preempts the largest first
    num_new: int = 0  # tokens generated in this dispatch
    table: BlockTable = field(default_factory=BlockTable)  # its blocks in the pool
    kv: ParkedKV | None = None  # reused KV held as tensors, until written into its blocks
    names: list[bytes] = field(default_factory=list)  # prefix-cache names of its full blocks
    num_named: int = 0  # of its leading blocks, those registered in the prefix cache
    cached_tokens: int = 0  # tokens of its context found in the prefix cache at admission

    @property
    def request_id(self) -> str:
        return self.item.request_id


def cache_root(runner: Runner, block_tokens: int, prefix_cache: bool) -> bytes:
    """The root of the prefix-cache names of full KV blocks (equal for equal models, dtypes and
    block sizes only); empty when the prefix cache is off."""
    if not prefix_cache:
        return b""
    return prefix_root(runner.info.name, str(runner.layout.dtype), block_tokens)


class Executor:
    """Runs dispatched batches on one Runner within ``kv_budget_bytes`` of KV cache."""

    def __init__(
        self,
        runner: Runner,
        kv_budget_bytes: int,
        max_step_tokens: int = DEFAULT_STEP_TOKENS,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        clock: Callable[[], float] = time.perf_counter,
        store: KVStore | None = None,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        prefix_cache: bool = True,
        stream_interval: int = 1,
    ) -> None:
        self.runner = runner
        self.info = runner.info
        self.kv_budget_bytes = kv_budget_bytes
        self.max_step_tokens = max_step_tokens  # tokens fed per step, prefill chunks included
        self.prefill_chunk_tokens = prefill_chunk_tokens  # a prompt is prefilled in such chunks
        self.pool = runner.new_pool(kv_budget_bytes, block_tokens, prefix_cache)
        self.prefix_root = cache_root(runner, block_tokens, prefix_cache)
        self._clock = clock
        self._store = store if store is not None else KVStore()
        self._store.pool = self.pool
        self._intake = KVIntake(self._store, runner.device, clock=clock)
        self._rows: list[_Row] = []  # the running set, in admission order
        self._joining: list[p.RunBatch] = []
        self._queued: deque[p.RunBatch] = deque()
        self._stats: dict[int, DispatchStats] = {}
        self._out = StepResult()
        self._tokens = TokenStream(stream_interval)  # sampled, not yet sent
        self._seq = 0
        self.progress = 0  # decode steps done
        # the last forward: (decode rows, their mean context, prefill rows, their mean length,
        # seconds), the shape a step log records (--step-log)
        self.last_shape: tuple[int, int, int, int, float] | None = None

    # -- commands (between steps) --------------------------------------------------------------

    def submit(self, run: p.RunBatch) -> None:
        """Queue a dispatch: join=True at the next step, else once the running set is empty."""
        if run.batch_id in self._stats:
            for item in run.items:
                message = f"batch id {run.batch_id} is already in use on this worker"
                self._out.released.append(p.Released(
                    batch_id=run.batch_id, request_id=item.request_id, reason="error",
                    num_generated=0, kv_kept=False, message=message,
                ))  # fmt: skip
            return
        self._stats[run.batch_id] = DispatchStats(run.batch_id, num_open=len(run.items))
        if not run.items:
            self._out.done.append(self._stats.pop(run.batch_id).done(self._clock()))
        else:
            self._intake.expect(run)
            (self._joining if run.join else self._queued).append(run)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Rows and queued items of these requests leave now ("aborted", reported by the next
        step()); their parked KV is freed."""
        ids = set(request_ids)
        for runs in (self._joining, self._queued):
            for run in list(runs):
                for item in [it for it in run.items if it.request_id in ids]:
                    self._release(run.batch_id, item.request_id, "aborted", 0, False)
                run.items = [it for it in run.items if it.request_id not in ids]
                if not run.items:
                    runs.remove(run)
        leaving = {i: ("aborted", "") for i, r in enumerate(self._rows) if r.request_id in ids}
        if leaving:
            self._leave(leaving)
        self._intake.cancel(ids)
        for request_id in ids:
            self._store.drop(request_id)

    def renew(self, renewals: Iterable[tuple[str, int]]) -> None:
        """Raise the step budgets of these requests' current dispatches (running or not yet
        started); a request not here any more is skipped. A running row gets blocks for its
        longer reservation now where the pool has them (else it grows a block at a time)."""
        budgets = dict(renewals)
        for run in (*self._joining, *self._queued):
            for item in run.items:
                if item.request_id in budgets:
                    item.max_steps = max(item.max_steps, budgets[item.request_id])
        for row in self._rows:
            if row.request_id in budgets:
                row.item.max_steps = max(row.item.max_steps, budgets[row.request_id])
                self.pool.allocate(row.table, self._reservation(row))

    def drop_kv(self, request_ids: Iterable[str]) -> None:
        """Free parked KV of these requests (no message)."""
        for request_id in request_ids:
            self._store.drop(request_id)

    def receive_kv(self, msg: KVArrived | KVFetchFailed) -> None:
        """A handoff this worker awaited arrived (parked, for its batch) or failed (recompute)."""
        if isinstance(msg, KVArrived):
            if self._intake.arrived(msg):
                self._land(msg.request_id, len(msg.token_ids))
        else:
            self._intake.failed(msg)

    def _land(self, request_id: str, num_tokens: int) -> None:
        """Write an arrival into blocks of the pool now, evicting parked KV that no dispatch
        waiting here needs (oldest first): the pool alone then holds the KV this worker keeps,
        within its budget, rather than the pool plus tensors beside it (which a GPU would have
        to find outside the budget). The broker reserved this request's slice here, so the room
        exists once parked KV makes way; where it does not, it waits as tensors, as before."""
        pool, table = self.pool, BlockTable()
        waiting = {item.request_id for run in (*self._joining, *self._queued) for item in run.items}
        need = pool.blocks_for(num_tokens)
        if need > pool.num_blocks or not self._free_blocks(need, waiting | {request_id}):
            return
        if pool.allocate(table, num_tokens):
            if not self._store.settle(request_id, table):
                pool.free(table)

    def fail_all(self, message: str) -> StepResult:
        """Release every running and queued request with "error" (after an internal failure)
        and return the messages; parked KV stays."""
        for run in [*self._joining, *self._queued]:
            for item in run.items:
                self._release(run.batch_id, item.request_id, "error", 0, False, message)
        self._joining, self._queued = [], deque()
        for row in self._rows:
            self.pool.free(row.table)
            self._release(row.batch_id, row.request_id, "error", row.num_new, False, message)
        self._rows = []
        return self._flush()

    # -- state ---------------------------------------------------------------------------------

    def has_work(self) -> bool:
        """True while rows run, dispatches wait, or messages wait for the next step()."""
        return bool(self._rows or self._joining or self._queued or self._out.pending)

    def wait_s(self) -> float | None:
        """None: no work; 0: step() makes progress now; else the seconds the next batch may
        still wait for handed-off KV (a command, e.g. its arrival, ends the wait earlier)."""
        if not self.has_work():
            return None
        if self._rows or self._out.pending:
            return 0.0
        waits = [self._intake.blocking_s(run) for run in self._joining]
        if self._queued and not self._joining:
            waits.append(self._intake.blocking_s(self._queued[0]))
        return min(waits, default=0.0)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def kv_parked_bytes(self) -> int:
        return self._store.parked_bytes

    @property
    def kv_host_bytes(self) -> int:
        return self._store.host_bytes

    @property
    def kv_used_bytes(self) -> int:
        """Allocated blocks of the pool (running and parked) plus staged arrivals, in bytes."""
        return self.pool.used_bytes + self._store.staged_bytes

    @property
    def kv_store(self) -> KVStore:
        return self._store

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """Admit what may start, then run one decode step of the running set."""
        self._admit()
        self._adopt_computed()
        self._guard()
        if self._rows:
            self._decode()
        return self._flush()

    def _flush(self) -> StepResult:
        out, self._out = self._out, StepResult()
        out.generated = self._tokens.take(force=out.pending or not self._rows)
        stored, removed = self.pool.take_events()
        if stored or removed:
            out.blocks = p.BlockEvents(stored=stored, removed=removed)
        return out

    def _admit(self) -> None:
        if self._joining:  # a join whose handed-off KV is on the way waits; the others join
            runs, waiting = [], []
            for run in self._joining:
                (runs if self._intake.blocking_s(run) <= 0 else waiting).append(run)
            self._joining = waiting
            if not runs:
                return
        elif not self._rows and self._queued:
            if self._intake.blocking_s(self._queued[0]) > 0:
                return  # its handed-off KV is on the way
            runs = [self._queued.popleft()]
        else:
            return
        now = self._clock()
        cands: list[_Row] = []
        for run in runs:
            stats = self._stats[run.batch_id]
            stats.started_at = now if stats.started_at is None else stats.started_at
            for item in run.items:
                busy_ids = {r.request_id for r in (*self._rows, *cands)}
                error = check_item(item, self.info, busy_ids)
                if error:
                    self._release(run.batch_id, item.request_id, "error", 0, False, error)
                else:
                    cands.append(self._candidate(run.batch_id, item))
        self._start(self._make_room(cands))

    def _candidate(self, batch_id: int, item: p.BatchItem) -> _Row:
        row = _Row(item, batch_id, list(item.token_ids), item.sampling, self._seq)
        self._seq += 1
        entry = self._intake.reuse(item, self._stats[batch_id])  # drops a stale entry
        if entry is not None and entry.table is not None:
            row.table = entry.table  # parked here: its blocks are adopted as they are
        elif entry is not None:
            row.kv = entry  # restored or handed off: written into blocks before the step
        elif self.prefix_root:  # shares the leading blocks the prefix cache holds, if any
            context = len(row.token_ids) - 1
            row.names = self._names(row, context // self.pool.block_tokens)
            row.cached_tokens = self.pool.share_prefix(row.table, row.names)
            row.num_named = len(row.table.blocks)
            stats = self._stats[batch_id]
            stats.prefix_query_tokens += context
            stats.prefix_hit_tokens += row.cached_tokens
        return row

    def _names(self, row: _Row, num_blocks: int) -> list[bytes]:
        """Prefix-cache names of the row's first ``num_blocks`` full blocks."""
        return block_hashes(
            row.token_ids, self.pool.block_tokens, self.prefix_root, num_blocks, row.names
        )

    def _register(self, row: _Row) -> None:
        """Name the row's blocks that became full (their KV written) in the prefix cache."""
        full = row.table.num_tokens // self.pool.block_tokens
        if self.prefix_root and full > row.num_named:
            if full > len(row.names):
                row.names = self._names(row, full)
            self.pool.register(row.table, row.names[:full], row.num_named)
            row.num_named = full

    def _steps_left(self, row: _Row) -> int:
        item = row.item
        left = min(item.max_steps, item.max_new_tokens) - row.num_new
        return max(1, min(left, self.info.max_context_len - len(row.token_ids)))

    def _reservation(self, row: _Row) -> int:
        """Tokens of KV a row holds at the end of its dispatch (its slice reservation)."""
        return len(row.token_ids) - 1 + self._steps_left(row)

    def _free_blocks(
        self, num_blocks: int, protect: set[str] | frozenset[str] = frozenset()
    ) -> bool:
        """Evict parked KV (oldest first, never that of ``protect``) until ``num_blocks`` blocks
        are free; False if not even evicting everything else parked gets there."""
        while self.pool.num_free < num_blocks:
            missing = (num_blocks - self.pool.num_free) * self.pool.block_bytes
            moved = self._store.evict_for(missing, protect)
            if not moved:
                return False
            self._out.offloaded += moved.offloaded
            self._out.evicted += moved.dropped
        return True

    def _make_room(self, cands: list[_Row]) -> list[_Row]:
        """Give each candidate blocks for its reservation, evicting parked KV as needed; one
        that cannot get blocks even for its first step is rejected (before any prefill)."""
        pool = self.pool
        for row in [r for r in cands if pool.blocks_for(len(r.token_ids)) > pool.num_blocks]:
            cands.remove(row)
            self._drop_row(row, "error", self._too_big(row))
        wanted = sum(pool.blocks_for(self._reservation(r)) - len(r.table.blocks) for r in cands)
        self._free_blocks(wanted + self._blocks_for_next_step())
        started = []
        for row in cands:
            if pool.allocate(row.table, self._reservation(row)):
                started.append(row)
            elif self._free_blocks(pool.blocks_for(len(row.token_ids))) and pool.allocate(
                row.table, len(row.token_ids)
            ):
                started.append(row)  # room for one step now; it grows a block at a time
            else:
                self._drop_row(row, "preempted", "")
        return started

    def _drop_row(self, row: _Row, reason: p.ReleaseReason, message: str) -> None:
        """A candidate that does not start: its blocks go back to the pool."""
        self.pool.free(row.table)
        self._release(row.batch_id, row.request_id, reason, 0, False, message)

    def _blocks_for_next_step(self) -> int:
        """New blocks the running rows need for their next step (after it, a row's KV covers
        its whole context)."""
        pool = self.pool
        return sum(
            max(0, pool.blocks_for(len(r.token_ids)) - len(r.table.blocks)) for r in self._rows
        )

    def _too_big(self, row: _Row) -> str:
        return too_big(row.request_id, len(row.token_ids), self.info, self.kv_budget_bytes)

    def _start(self, cands: list[_Row]) -> None:
        """Write reused KV held as tensors into its blocks and add the rows to the running set.
        Rows without KV are prefilled by the next steps' forwards (see ``_feeds``)."""
        for row in cands:
            if row.kv is not None:
                assert row.kv.layers is not None
                self.pool.write(row.table, row.kv.layers)
                row.kv = None
                self._register(row)
            elif row.table.num_tokens < len(row.token_ids) - 1:
                self._count_prefill(row)
        self._rows += cands

    def _feeds(self) -> list[list[int]]:
        """What each row feeds this step: a running row its last token; a row still being
        prefilled the next chunk of its context, cut at fixed multiples of
        ``prefill_chunk_tokens`` (so that a row's chunks, hence its numbers, do not depend on
        the other rows), oldest rows first while the step's ``max_step_tokens`` last, and
        always at least the oldest one (chunked prefill: a long prompt never stalls the
        running rows for long). An empty feed sits this step out."""
        todos = [r.token_ids[r.table.num_tokens :] for r in self._rows]
        room = self.max_step_tokens - sum(1 for t in todos if len(t) <= 1)
        feeds = []
        first = True
        computing: set[bytes] = set()  # names of the blocks this step's prefills complete
        bt = self.pool.block_tokens
        for row, todo in zip(self._rows, todos, strict=True):
            if len(todo) <= 1:
                feeds.append(todo)
                continue
            start = row.table.num_tokens
            if start % bt == 0 and start // bt < len(row.names):
                if row.names[start // bt] in computing:  # an older row computes it now:
                    feeds.append([])  # take it next step (``_adopt_computed``), not twice
                    continue
            chunk = self.prefill_chunk_tokens
            take = todo[: chunk - start % chunk]
            if first or len(take) <= room:
                feeds.append(take)
                room -= len(take)
                first = False
                computing.update(row.names[start // bt : (start + len(take)) // bt])
            else:
                feeds.append([])
        return feeds

    def _count_prefill(self, row: _Row, sign: int = 1) -> None:
        """Count (sign -1: uncount) what is left to prefill of the row's context."""
        stats = self._stats[row.batch_id]
        todo = len(row.token_ids) - 1 - row.table.num_tokens
        stats.prefill_tokens += sign * todo
        stats.recomputed_tokens += sign * max(0, min(row.item.num_generated - 1, todo))

    def _adopt_computed(self) -> None:
        """Rows being prefilled that waited for a block an older row computed (see ``_feeds``)
        take the named blocks that now continue their context instead of computing them."""
        bt = self.pool.block_tokens
        for row in self._rows:
            table = row.table
            nxt = table.num_tokens // bt
            if table.num_tokens % bt or nxt >= len(row.names) or row.names[nxt] not in self.pool:
                continue  # mid-block, no named block next, or none known
            self._count_prefill(row, -1)
            adopted = self.pool.adopt_prefix(table, row.names)
            self._count_prefill(row)
            row.cached_tokens += adopted
            row.num_named = max(row.num_named, table.num_tokens // bt)
            self._stats[row.batch_id].prefix_hit_tokens += adopted

    def _guard(self) -> None:
        """Before a step: every row gets a block for its next token, evicting parked KV, then
        preempting the newest rows, when the pool has too few."""
        while self._rows:
            if self._free_blocks(self._blocks_for_next_step()):
                for row in self._rows:
                    self.pool.allocate(row.table, len(row.token_ids))
                return
            newest = max(range(len(self._rows)), key=lambda i: self._rows[i].seq)
            if len(self._rows) == 1:
                self._leave({newest: ("error", self._too_big(self._rows[newest]))})
            else:
                self._leave({newest: ("preempted", "")})

    def _decode(self) -> None:
        """One forward of every row's feed (``_feeds``), then one sampled token for each row
        whose whole context is now in its KV (a row mid-prefill samples nothing yet)."""
        feeds = zip(self._rows, self._feeds(), strict=True)
        fed = [(i, r, tokens) for i, (r, tokens) in enumerate(feeds) if tokens]
        prefills = [len(tokens) for _, _, tokens in fed if len(tokens) > 1]
        decoded = [r for _, r, tokens in fed if len(tokens) == 1]
        started_at = self._clock()
        logits = self.runner.forward(self.pool, [(r.table, tokens) for _, r, tokens in fed])
        # rows whose whole context is in their KV now: (index in fed, index in rows, row)
        full = [
            (k, i, r) for k, (i, r, _) in enumerate(fed) if r.table.num_tokens == len(r.token_ids)
        ]
        for _, r, _ in fed:
            self._register(r)
        ready = [i for _, i, _ in full]
        rows = [r for _, _, r in full]
        indices = [r.item.num_generated + r.num_new for r in rows]
        tokens = self.runner.sample(
            logits[[k for k, _, _ in full]], [r.params for r in rows], indices
        )
        elapsed_s = self._clock() - started_at
        self.progress += 1
        total_bytes = self.kv_used_bytes
        batch_ids = {r.batch_id for r in self._rows}
        for batch_id in batch_ids:
            self._stats[batch_id].steps += 1
            self._stats[batch_id].peak_bytes = max(self._stats[batch_id].peak_bytes, total_bytes)
        self._time_sample(decoded, prefills, elapsed_s, batch_ids)
        leaving: dict[int, tuple[p.ReleaseReason, str]] = {}
        stream = self._tokens
        for i, row, token in zip(ready, rows, tokens, strict=True):
            row.token_ids.append(token)
            row.num_new += 1
            self._stats[row.batch_id].generated_tokens += 1
            stream.add(row.request_id, token, row.item.num_generated + row.num_new == 1)
            reason = self._finish_reason(row, token)
            if reason is not None:
                leaving[i] = (reason, "")
        stream.step()
        if leaving:
            self._leave(leaving)

    def _time_sample(
        self, decoded: list[_Row], prefills: list[int], elapsed_s: float, batch_ids: set[int]
    ) -> None:
        """The step as a time-model sample: decode (rows, mean context after the step), prefill
        (rows, mean length), or mixed (both, in one forward)."""
        n = len(decoded)
        context_len = round(sum(r.table.num_tokens for r in decoded) / n) if n else 0
        mean_len = round(sum(prefills) / len(prefills)) if prefills else 0
        self.last_shape = (n, context_len, len(prefills), mean_len, elapsed_s)
        for batch_id in batch_ids:
            stats = self._stats[batch_id]
            if not prefills:
                stats.decode_samples.add((n, context_len, elapsed_s))
            elif not decoded:
                stats.prefill_samples.add((len(prefills), mean_len, elapsed_s))
            elif len(stats.mixed_samples) < MAX_SAMPLES:  # the first ones: joins come early
                stats.mixed_samples.append((n, context_len, len(prefills), mean_len, elapsed_s))

    def _finish_reason(self, row: _Row, token: int) -> p.ReleaseReason | None:
        if token in self.info.eos_token_ids and not row.item.sampling.ignore_eos:
            return "eos"
        if row.num_new >= row.item.max_new_tokens:
            return "length"
        if len(row.token_ids) >= self.info.max_context_len:
            return "length"
        if row.num_new >= row.item.max_steps:
            return "budget"
        return None

    def _leave(self, leaving: dict[int, tuple[p.ReleaseReason, str]]) -> None:
        """Release rows (by index): "budget" rows with keep_kv park their blocks here (the
        unused rest of their reservation goes back to the pool); the others free theirs."""
        for i, (reason, message) in sorted(leaving.items()):
            row = self._rows[i]
            kept = reason == "budget" and row.item.keep_kv
            if kept:
                self.pool.free(row.table, keep_tokens=row.table.num_tokens)
                self._store.park_table(row.request_id, row.token_ids[:-1], row.table)
            else:
                self.pool.free(row.table)
            self._release(
                row.batch_id, row.request_id, reason, row.num_new, kept, message, row.cached_tokens
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
            self._out.done.append(self._stats.pop(batch_id).done(self._clock()))
