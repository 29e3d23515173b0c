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
- Row invariant: a row's cache covers ``token_ids[:-1]``; every step feeds each row's last token
  and samples one new token. A new row is prefilled with ``token_ids[:-1]`` unless KV parked
  here (device or host tier) covers exactly that (then it is reused). A sequential batch whose
  items name a peer (``kv_source``) starts once their handed-off KV arrived or failed.
- A row leaves with "eos" (sampled an EOS id and not ``ignore_eos``; the EOS token is reported
  in Generated), "length" (``max_new_tokens`` reached, or the context reached the model's
  maximum), "budget" (``max_steps`` of this dispatch used; with ``keep_kv`` its KV is parked and
  ``kv_kept`` is True), "aborted", "preempted" (memory guard) or "error" (bad input).
- Memory guard, always on: before a batch starts, parked KV of other requests is evicted (oldest
  first) until the batch's whole growth fits; before every step, if the live cache after the
  step plus parked KV would exceed the budget, parked KV is evicted, then the newest admitted
  rows are preempted. Evicted KV goes to the host tier where it fits and pays
  (StepResult.offloaded), else it is gone (StepResult.evicted: those requests recompute).
- BatchDone per dispatch when its last request left. Counters (tokens): ``prefill_tokens`` all
  prefilled positions of real tokens; ``pad_tokens`` padded positions of prefill forwards plus,
  at every decode step, each row's padded (masked) cache columns; ``recomputed_tokens`` prefilled
  tokens that the request had generated before (``max(0, num_generated - 1)`` per prefilled row:
  its last token is fed by the decode step, not prefilled); ``reused_kv_tokens`` tokens covered
  by reused parked KV (``handoff_tokens`` of them handed off by a peer, ``restored_tokens``
  restored from the host tier); ``invalid_tokens`` is always 0 (finished rows leave at once).
  ``measured_peak_bytes``: max over its steps of live cache bytes (allocated buffers) + parked.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine import protocol as p
from engine.worker.batch_cache import BatchCache, merge
from engine.worker.dispatch import DispatchStats, check_item, prefill_chunks, too_big
from engine.worker.kv_reuse import KVArrived, KVFetchFailed, KVIntake
from engine.worker.kv_store import KVStore
from engine.worker.runner import Runner, SamplingParams


@dataclass(slots=True)
class StepResult:
    """Messages to send after a step, in this order."""

    generated: p.Generated | None = None  # one new token per row that stepped
    released: list[p.Released] = field(default_factory=list)
    done: list[p.BatchDone] = field(default_factory=list)
    offloaded: list[str] = field(default_factory=list)  # parked KV moved to the host tier
    evicted: list[str] = field(default_factory=list)  # parked KV freed: these must recompute


@dataclass(slots=True)
class _Row:
    item: p.BatchItem
    batch_id: int
    token_ids: list[int]  # the whole context; grows by one token per step
    params: SamplingParams
    seq: int  # admission order: the memory guard preempts the largest first
    num_new: int = 0  # tokens generated in this dispatch
    kv: BatchCache | None = None  # reused parked KV, until merged into the batch cache

    @property
    def request_id(self) -> str:
        return self.item.request_id


class Executor:
    """Runs dispatched batches on one Runner within ``kv_budget_bytes`` of KV cache."""

    def __init__(
        self,
        runner: Runner,
        kv_budget_bytes: int,
        max_prefill_tokens: int = 4096,
        clock: Callable[[], float] = time.perf_counter,
        store: KVStore | None = None,
    ) -> None:
        self.runner = runner
        self.info = runner.info
        self.kv_budget_bytes = kv_budget_bytes
        self.max_prefill_tokens = max_prefill_tokens  # padded tokens per prefill forward
        self._clock = clock
        self._store = store if store is not None else KVStore()
        self._intake = KVIntake(self._store, runner.device, clock=clock)
        self._rows: list[_Row] = []
        self._cache: BatchCache | None = None  # rows of self._rows, in order
        self._joining: list[p.RunBatch] = []
        self._queued: deque[p.RunBatch] = deque()
        self._stats: dict[int, DispatchStats] = {}
        self._out = StepResult()
        self._seq = 0
        self._live_bytes = 0
        self.progress = 0  # decode steps done

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

    def drop_kv(self, request_ids: Iterable[str]) -> None:
        """Free parked KV of these requests (no message)."""
        for request_id in request_ids:
            self._store.drop(request_id)

    def receive_kv(self, msg: KVArrived | KVFetchFailed) -> None:
        """A handoff this worker awaited arrived (parked, for its batch) or failed (recompute)."""
        if isinstance(msg, KVArrived):
            self._intake.arrived(msg)
        else:
            self._intake.failed(msg)

    def fail_all(self, message: str) -> StepResult:
        """Release every running and queued request with "error" (after an internal failure)
        and return the messages; parked KV stays."""
        for run in [*self._joining, *self._queued]:
            for item in run.items:
                self._release(run.batch_id, item.request_id, "error", 0, False, message)
        self._joining, self._queued = [], deque()
        for row in self._rows:
            self._release(row.batch_id, row.request_id, "error", row.num_new, False, message)
        self._rows, self._cache, self._live_bytes = [], None, 0
        return self._flush()

    # -- state ---------------------------------------------------------------------------------

    def has_work(self) -> bool:
        """True while rows run, dispatches wait, or messages wait for the next step()."""
        out = self._out
        pending = out.generated or out.released or out.done or out.evicted or out.offloaded
        return bool(self._rows or self._joining or self._queued or pending)

    def wait_s(self) -> float | None:
        """None: no work; 0: step() makes progress now; else the seconds the next batch may
        still wait for handed-off KV (a command, e.g. its arrival, ends the wait earlier)."""
        if not self.has_work():
            return None
        out = self._out
        pending = out.generated or out.released or out.done or out.evicted or out.offloaded
        if self._rows or pending:
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
        """Live batch cache (allocated buffers) plus parked KV, in bytes."""
        return self._live_bytes + self._store.parked_bytes

    @property
    def kv_store(self) -> KVStore:
        return self._store

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """Admit what may start, then run one decode step of the running set."""
        self._admit()
        self._guard()
        if self._rows:
            self._decode()
        return self._flush()

    def _flush(self) -> StepResult:
        out, self._out = self._out, StepResult()
        return out

    def _admit(self) -> None:
        if self._joining:  # a join whose handed-off KV is on the way waits; the others join
            runs = []
            for run in list(self._joining):
                if self._intake.blocking_s(run) <= 0:
                    runs.append(run)
                    self._joining.remove(run)
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
        cands = self._make_room(cands, sequential=not runs[0].join)
        if cands:
            self._start(cands)

    def _candidate(self, batch_id: int, item: p.BatchItem) -> _Row:
        params = SamplingParams(item.temperature, item.top_p, item.top_k, item.seed)
        row = _Row(item, batch_id, list(item.token_ids), params, self._seq)
        self._seq += 1
        row.kv = self._intake.reuse(item, self._stats[batch_id])  # drops a stale entry
        return row

    def _steps_left(self, row: _Row) -> int:
        item = row.item
        left = min(item.max_steps, item.max_new_tokens) - row.num_new
        return max(1, min(left, self.info.max_context_len - len(row.token_ids)))

    def _evict(self, num_bytes: int) -> bool:
        if num_bytes <= 0:
            return False
        moved = self._store.evict_for(num_bytes)
        self._out.offloaded += moved.offloaded
        self._out.evicted += moved.dropped
        return bool(moved)

    def _make_room(self, cands: list[_Row], sequential: bool) -> list[_Row]:
        """Evict parked KV so the new rows fit (a sequential batch: its whole growth); reject
        the newest candidates, before any prefill, while even their first step cannot fit."""
        kvpt, budget = self.info.kv_bytes_per_token, self.kv_budget_bytes
        for row in [r for r in cands if len(r.token_ids) * kvpt > budget]:
            cands.remove(row)
            self._release(row.batch_id, row.request_id, "error", 0, False, self._too_big(row))
        if sequential and cands:
            num_cols = max(len(r.token_ids) - 1 + self._steps_left(r) for r in cands)
            self._evict(len(cands) * num_cols * kvpt + self._store.parked_bytes - budget)
        while cands:
            num_cols = max([len(r.token_ids) for r in cands] + [self._cols_after_step()])
            num_bytes = (len(self._rows) + len(cands)) * num_cols * kvpt
            over = num_bytes + self._store.parked_bytes - budget
            if over <= 0:
                break
            if self._evict(over):
                continue
            row = cands.pop()
            self._release(row.batch_id, row.request_id, "preempted", 0, False)
        return cands

    def _cols_after_step(self) -> int:
        """Columns of the running rows after their next step (the merge reallocates)."""
        return 0 if self._cache is None else self._cache.num_cols + 1

    def _too_big(self, row: _Row) -> str:
        return too_big(row.request_id, len(row.token_ids), self.info, self.kv_budget_bytes)

    def _spare_cols(self, num_rows: int, num_cols: int, max_left: int) -> int:
        """Spare capacity for a cache of ``num_cols`` columns: up to the runner's growth step,
        no more than any row can use, within the budget where possible (at least one)."""
        room = (self.kv_budget_bytes - self._store.parked_bytes) // max(
            1, num_rows * self.info.kv_bytes_per_token
        )
        return max(1, min(self.runner.kv_growth_cols, max_left, room - num_cols))

    def _start(self, cands: list[_Row]) -> None:
        """Prefill the candidates without reusable KV, then merge everything into one cache."""
        parts = [self._cache] if self._cache is not None else []
        rows = list(self._rows)
        pending = [r for r in cands if r.kv is None]
        for chunk in prefill_chunks(
            pending, lambda r: len(r.token_ids) - 1, self.max_prefill_tokens
        ):
            started_at = self._clock()
            part = self.runner.prefill([r.token_ids[:-1] for r in chunk])
            self.runner.synchronize()
            elapsed_s = self._clock() - started_at
            for row in chunk:
                stats, num_tokens = self._stats[row.batch_id], len(row.token_ids) - 1
                stats.prefill_tokens += num_tokens
                stats.pad_tokens += part.num_cols - num_tokens
                stats.recomputed_tokens += max(0, row.item.num_generated - 1)
            for batch_id in {r.batch_id for r in chunk} if part.num_cols else ():
                self._stats[batch_id].prefill_samples.add((len(chunk), part.num_cols, elapsed_s))
            parts.append(part)
            rows += chunk
        for row in cands:
            if row.kv is not None:
                parts.append(row.kv)
                row.kv = None
                rows.append(row)
        num_cols = max((len(r.token_ids) - 1 for r in rows), default=0)
        spare = self._spare_cols(len(rows), num_cols, max(self._steps_left(r) for r in rows))
        self._cache = merge(self.runner.layout, parts, spare)
        self._rows = rows
        self._update_live()

    def _guard(self) -> None:
        """Before a step: evict parked KV, then preempt the newest rows, until the step fits."""
        kvpt = self.info.kv_bytes_per_token
        while self._rows:
            num_bytes = len(self._rows) * (self._cache.num_cols + 1) * kvpt
            over = max(num_bytes, self._live_bytes) + self.kv_parked_bytes - self.kv_budget_bytes
            if over <= 0:
                return
            if self._evict(over):
                continue
            newest = max(range(len(self._rows)), key=lambda i: self._rows[i].seq)
            if len(self._rows) == 1:
                self._leave({newest: ("error", self._too_big(self._rows[newest]))})
            else:
                self._leave({newest: ("preempted", "")})

    def _decode(self) -> None:
        rows, cache = self._rows, self._cache
        assert cache is not None
        growth = self._spare_cols(len(rows), cache.num_cols, max(map(self._steps_left, rows)))
        started_at = self._clock()
        logits = self.runner.decode(cache, [r.token_ids[-1] for r in rows], growth)
        indices = [r.item.num_generated + r.num_new for r in rows]
        tokens = self.runner.sample(logits, [r.params for r in rows], indices)
        elapsed_s = self._clock() - started_at
        self.progress += 1
        self._update_live()
        total_bytes = self.kv_used_bytes
        for batch_id in {r.batch_id for r in rows}:
            stats = self._stats[batch_id]
            stats.steps += 1
            stats.peak_bytes = max(stats.peak_bytes, total_bytes)
            stats.decode_samples.add((len(rows), cache.num_cols, elapsed_s))
        leaving: dict[int, tuple[p.ReleaseReason, str]] = {}
        generated = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.token_ids.append(token)
            row.num_new += 1
            stats = self._stats[row.batch_id]
            stats.generated_tokens += 1
            stats.pad_tokens += cache.pad_lens[i]
            generated.append((row.request_id, [token]))
            reason = self._finish_reason(row, token)
            if reason is not None:
                leaving[i] = (reason, "")
        self._out.generated = p.Generated(tokens=generated)
        if leaving:
            self._leave(leaving)

    def _finish_reason(self, row: _Row, token: int) -> p.ReleaseReason | None:
        if token in self.info.eos_token_ids and not row.item.ignore_eos:
            return "eos"
        if row.num_new >= row.item.max_new_tokens:
            return "length"
        if len(row.token_ids) >= self.info.max_context_len:
            return "length"
        if row.num_new >= row.item.max_steps:
            return "budget"
        return None

    def _leave(self, leaving: dict[int, tuple[p.ReleaseReason, str]]) -> None:
        """Release rows (by index; "budget" rows with keep_kv park their KV) and shrink the
        batch cache to the rows that stay."""
        assert self._cache is not None
        for i, (reason, message) in sorted(leaving.items()):
            row = self._rows[i]
            kept = reason == "budget" and row.item.keep_kv
            if kept:
                self._store.park(row.request_id, row.token_ids[:-1], self._cache.row_kv(i))
            self._release(row.batch_id, row.request_id, reason, row.num_new, kept, message)
        stay = [i for i in range(len(self._rows)) if i not in leaving]
        self._rows = [self._rows[i] for i in stay]
        if stay:
            self._cache.select(stay)
        else:
            self._cache = None
        self._update_live()

    def _release(
        self,
        batch_id: int,
        request_id: str,
        reason: p.ReleaseReason,
        num_generated: int,
        kv_kept: bool,
        message: str = "",
    ) -> None:
        self._out.released.append(p.Released(
            batch_id=batch_id, request_id=request_id, reason=reason,
            num_generated=num_generated, kv_kept=kv_kept, message=message,
        ))  # fmt: skip
        stats = self._stats[batch_id]
        stats.num_open -= 1
        if stats.num_open == 0:
            self._out.done.append(self._stats.pop(batch_id).done(self._clock()))

    def _update_live(self) -> None:
        self._live_bytes = 0 if self._cache is None else self._cache.nbytes
