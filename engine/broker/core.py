"""The broker's state machine: request table, workers, policy application. No sockets, no clocks:
every method takes ``now`` and appends what must be sent to ``outbox``."""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from engine import protocol as p
from engine.broker import admission, intake
from engine.broker.expiry import Expiry
from engine.broker.journal import Journal, NoJournal
from engine.broker.kv_ledger import KVLedger
from engine.broker.plan_check import plan_problems
from engine.broker.prefix_index import PrefixIndex
from engine.broker.request_log import log_request_end
from engine.broker.requests import Request, RequestState
from engine.broker.resume import FinishedCache, FinishedEntry, fingerprint
from engine.broker.text import Decode
from engine.broker.validation import Limits
from engine.broker.views import waiting_view, worker_view
from engine.broker.workers import BatchState, WorkerState
from engine.config import SchedulerConfig
from engine.cost_model import CostModel
from engine.errors import SubmitError
from engine.kv_cost import KVMoveModel
from engine.scheduler.base import Dispatch, Policy, WaitingRequest, WorkerView

log = logging.getLogger(__name__)

_FINISH_REASONS: dict[str, p.FinishReason] = {"eos": "stop", "length": "length"}
# A worker's time model is refitted on its BatchDone samples at most this often (the samples
# of BatchDones between join its window and count at the next refit): a refit costs about
# 0.5 ms, and at tens of workers BatchDones come hundreds a second, while the speed a refit
# follows changes over seconds.
REFIT_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class ToClient:
    client_id: bytes
    msg: p.Accepted | p.Delta | p.Finished | p.Error
    droppable: bool = False  # not part of a live request's replies (see broker/outbox.py)


@dataclass(frozen=True, slots=True)
class ToWorker:
    worker_id: str
    identity: bytes
    msg: p.RunBatch | p.Renew | p.Abort | p.DropKV | p.Shutdown | p.Ping | p.Reset


class BrokerCore:
    """Owns every request's state; applies the policy's plans and checks them."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        policy: Policy,
        decode: Decode,
        limits: Limits,
        queue_limits: admission.QueueLimits | None = None,
        client_grace_s: float = 5.0,
        journal: Journal | NoJournal | None = None,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.decode = decode
        self.limits = limits
        self.requests: dict[str, Request] = {}  # live (waiting or running) requests
        self.waiting: dict[str, Request] = {}  # insertion order = arrival order (then requeue)
        self.workers: dict[str, WorkerState] = {}
        self.outbox: list[ToClient | ToWorker] = []
        self.done: collections.deque[Request] = collections.deque(maxlen=2048)
        self.batch_records: collections.deque[p.BatchRecord] = collections.deque(maxlen=256)
        self.events: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=200)
        self.num_finished = 0
        self.num_failed = 0
        self.queue_limits = queue_limits or admission.QueueLimits()
        self.num_queued_tokens = 0  # prompt plus max_tokens of every live request
        self.num_rejected = 0  # "overloaded" refusals
        self.num_renewals = 0  # slices renewed before they ended (the request ran on)
        self.num_slice_stops = 0  # slices that ended with the request back in the pool
        self.num_preempted = 0  # requests a worker's memory guard sent back
        self.draining = False  # shutting down: accept nothing new
        self.expiry = Expiry(client_grace_s)
        self.finished_cache = FinishedCache()
        self._batch_ids = itertools.count(1)
        self._auto_ids = itertools.count(1)
        self.kv = KVLedger()  # the one owner of where parked KV is, and of handoffs in flight
        self.journal = journal or NoJournal()  # what a restarted broker continues from
        self.prefix = PrefixIndex()  # which KV blocks each worker's prefix cache holds

    # -- clients ---------------------------------------------------------------------------

    def submit(
        self, client_id: bytes, msg: p.Submit, prompt_ids: list[int], now: float, owner: bytes = b""
    ) -> None:
        """Accept (or refuse) a request. ``owner``: the client's CURVE key (b"" without CURVE);
        a resubmission from another connection with the same owner resumes the request."""
        request_id = msg.request_id or f"req-{next(self._auto_ids)}"
        fp = fingerprint(msg, prompt_ids)
        if intake.resume(self, client_id, request_id, fp, owner, msg.stream):
            return
        try:
            intake.check(self, request_id, msg, prompt_ids)
        except SubmitError as exc:
            self.outbox.append(ToClient(client_id, exc.error(request_id), droppable=True))
            return
        req = Request.create(request_id, client_id, msg, prompt_ids, self.decode, now)
        req.owner, req.fingerprint = owner, fp
        req.deadline_at = None if msg.deadline_s is None else now + msg.deadline_s
        self.journal.accepted(request_id, msg, prompt_ids, owner)
        self.add_request(req)
        self.outbox.append(
            ToClient(client_id, p.Accepted(request_id=request_id, prompt_tokens=len(prompt_ids)))
        )

    def add_request(self, req: Request) -> None:
        """Into the request table and the queue: a request just accepted, or one recovered."""
        self.requests[req.request_id] = req
        self.waiting[req.request_id] = req
        self.num_queued_tokens += req.queued_tokens
        self.expiry.watch(req)
        self.finished_cache.discard(req.request_id)

    def refuse_unjournaled(self, request_ids: list[str]) -> None:
        """The journal could not record these requests accepted in this tick: withdraw their
        Accepted (not sent yet) and refuse them instead; nothing durable was promised."""
        ids = set(request_ids)
        self.outbox = [
            m for m in self.outbox
            if not (isinstance(m.msg, p.Accepted) and m.msg.request_id in ids and not m.msg.resumed)
        ]  # fmt: skip
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is None:
                continue
            if req.state is RequestState.RUNNING and req.worker_id in self.workers:
                self._send(self.workers[req.worker_id], p.Abort(request_ids=[request_id]))
            req.state = RequestState.FAILED
            self.journal.ended(request_id)
            self._forget(req)
            error = p.Error(
                code="journal_unavailable", message=self.journal.problem, request_id=request_id
            )
            self.outbox.append(ToClient(req.client_id, error, droppable=True))

    def cancel(self, client_id: bytes, request_id: str, now: float) -> None:
        req = self.requests.get(request_id)
        if req is None or req.client_id != client_id:
            msg = f"cancel: no request {request_id!r} is in flight for this client (finished already, or never submitted)"
            self.outbox.append(
                ToClient(
                    client_id, p.Error(code="unknown_request", message=msg, request_id=request_id)
                )
            )
            return
        self._finish(req, "cancelled", now, RequestState.CANCELLED)

    def client_gone(self, client_id: bytes, now: float) -> None:
        """The client's connection closed: its requests run on for the grace period (it may
        reconnect and resume them), then expire() cancels them."""
        for req in self.requests.values():
            if req.client_id == client_id:
                self.expiry.orphan(req.request_id, now)

    def expire(self, now: float) -> None:
        """End requests past their deadline, and those whose client left and did not return."""
        for req, why in self.expiry.due(now, self.requests):
            if req.request_id not in self.requests:
                continue
            if why == "abandoned":
                self._finish(req, "cancelled", now, RequestState.CANCELLED, notify=False)
                continue
            message = (
                f"request {req.request_id!r} did not finish within its deadline_s "
                f"({len(req.generated)} of {req.params.max_tokens} tokens generated): it was "
                "stopped. Pass a larger deadline_s or a smaller max_tokens"
            )
            self.end_with_error(req, "deadline_exceeded", message, now)

    def end_with_error(self, req: Request, code: str, message: str, now: float) -> None:
        """Stop a live request wherever it is and answer it with an Error."""
        if req.state is RequestState.RUNNING and req.worker_id in self.workers:
            self._send(self.workers[req.worker_id], p.Abort(request_ids=[req.request_id]))
        self._fail(req, code, message, now)

    def stop_all(self, code: str, message: str, now: float) -> None:
        """End every live request with an Error (the broker stops)."""
        for req in list(self.requests.values()):
            self.end_with_error(req, code, message, now)

    # -- workers ---------------------------------------------------------------------------

    def add_worker(self, identity: bytes, ready: p.Ready, now: float) -> None:
        if ready.worker_id in self.workers:
            self.remove_worker(
                ready.worker_id, now, reason=f"announced again (session {ready.session})"
            )
        moves = KVMoveModel.measured(
            ready.copy_bytes_per_s, ready.transfer_bytes_per_s, ready.transfer_latency_s
        )
        cost = CostModel.from_ready(
            ready.time_model,
            ready.kv_bytes_per_token,
            ready.kv_budget_bytes,
            moves,
            kv_block_tokens=ready.kv_block_tokens,
        )
        self.workers[ready.worker_id] = WorkerState(
            worker_id=ready.worker_id,
            identity=identity,
            ready=ready,
            cost=cost,
            joined_at=now,
            last_seen_at=now,
            session=ready.session,
        )
        self.limits = self.limits.with_worker(ready)
        self.prefix.add_worker(ready.worker_id, ready.prefix_root, ready.kv_block_tokens)
        self.log(
            now,
            "info",
            f"worker {ready.worker_id} joined ({ready.device}, {ready.dtype}, "
            f"KV budget {ready.kv_budget_bytes / 2**20:.0f} MiB)",
        )

    def remove_worker(self, worker_id: str, now: float, reason: str, reset: bool = False) -> None:
        """Forget a worker; everything it was running goes back to the pool with the tokens
        already generated (the request continues from there on another worker). ``reset``: it
        may still be alive, so tell it to drop everything and announce itself again."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        if reset:
            self._send(worker, p.Reset(session=worker.session, reason=reason))
        self.kv.worker_lost(worker_id)
        self.prefix.remove_worker(worker_id)
        num_requeued = 0
        for req in self.requests.values():
            if req.worker_id == worker_id and req.state is RequestState.RUNNING:
                self._requeue(req, now)
                num_requeued += 1
        requeued = f"{num_requeued} request{'' if num_requeued == 1 else 's'} requeued"
        self.log(now, "warning", f"worker {worker_id} lost ({reason}); {requeued}")

    def on_worker_message(self, worker: WorkerState, msg: p.FromWorker, now: float) -> None:
        """Apply a message of a worker that has joined (its Ready goes to ``add_worker``): the
        one dispatch the server and the simulator share."""
        if isinstance(msg, p.Generated):
            self.on_generated(worker, msg, now)
        elif isinstance(msg, p.Released):
            self.on_released(worker, msg, now)
        elif isinstance(msg, p.BatchDone):
            self.on_batch_done(worker, msg, now)
        elif isinstance(msg, p.Heartbeat):
            self.on_heartbeat(worker, msg, now)
        elif isinstance(msg, p.KVEvicted):
            self.on_kv_evicted(worker, msg.request_ids, msg.offloaded)
        elif isinstance(msg, p.BlockEvents):
            self.prefix.apply(worker.worker_id, msg.stored, msg.removed)
        elif isinstance(msg, p.WorkerFailed):
            self.on_worker_failed(worker, msg, now)
        elif isinstance(msg, p.Draining):
            self.on_draining(worker, msg, now)

    def worker_by_identity(self, identity: bytes) -> WorkerState | None:
        for worker in self.workers.values():
            if worker.identity == identity:
                return worker
        return None

    def on_heartbeat(self, worker: WorkerState, msg: p.Heartbeat, now: float) -> None:
        worker.heartbeat = msg
        if msg.progress != worker.progress:
            worker.progress, worker.progress_at = msg.progress, now

    def on_draining(self, worker: WorkerState, msg: p.Draining, now: float) -> None:
        worker.draining = True
        self.log(
            now,
            "info",
            f"worker {worker.worker_id} is draining (leaves within {msg.deadline_s:.0f} s)",
        )

    def on_generated(self, worker: WorkerState, msg: p.Generated, now: float) -> None:
        worker.progress_at = now
        num_tokens = 0
        worker_id, requests, running = worker.worker_id, self.requests, RequestState.RUNNING
        holder = self.workers.get(worker_id)  # the state its requests' batches are in
        for request_id, token_ids in msg.tokens:
            req = requests.get(request_id)
            if req is None or req.worker_id != worker_id or req.state is not running:
                continue  # finished by a stop string or cancelled while the worker ran on
            num_tokens += len(token_ids)
            self._append_tokens(req, token_ids, now, holder)
        if num_tokens and holder is not None:
            holder.running_view = None  # its requests' contexts grew
        worker.generated_tokens += num_tokens
        worker.token_times.append((now, num_tokens))

    def on_released(self, worker: WorkerState, msg: p.Released, now: float) -> None:
        batch = worker.batches.get(msg.batch_id)
        if batch is not None:
            batch.request_ids.discard(msg.request_id)
            worker.running_view = None
            if msg.reason in ("eos", "length") and batch.step < batch.dispatch.max_steps:
                batch.num_finished += 1
        req = self.requests.get(msg.request_id)
        if req is None or req.worker_id != worker.worker_id or req.batch_id != msg.batch_id:
            if msg.kv_kept:  # the request ended meanwhile (stop string, cancel): free its KV
                self._send(worker, p.DropKV(request_ids=[msg.request_id]))
            return
        self._send_all(self.kv.settle(req.request_id))  # a handoff into this batch is over
        if req.generated_at_dispatch == 0:  # its prompt's first prefill: what the cache saved
            req.cached_tokens = msg.cached_tokens
        if msg.reason in _FINISH_REASONS:
            self._finish(req, _FINISH_REASONS[msg.reason], now, RequestState.FINISHED)
        elif msg.reason in ("budget", "preempted"):
            self._missed_renewals(req, msg.num_generated)
            self.num_slice_stops += msg.reason == "budget"
            self.num_preempted += msg.reason == "preempted"
            self._requeue(req, now)
            if msg.kv_kept:
                nbytes = req.context_len * worker.ready.kv_bytes_per_token
                self._send_all(self.kv.parked(req.request_id, worker.worker_id, nbytes))
        elif msg.reason == "error":
            self._fail(req, "internal", f"the worker could not run it: {msg.message}", now)

    def on_kv_evicted(
        self, worker: WorkerState, request_ids: list[str], offloaded: bool = False
    ) -> None:
        """Parked KV left the worker's device: to its host tier (``offloaded``), or gone."""
        self.kv.evicted(worker.worker_id, request_ids, offloaded)

    def on_batch_done(self, worker: WorkerState, msg: p.BatchDone, now: float) -> None:
        batch = worker.finish_batch(msg.batch_id, msg.measured_s, now)
        refit = now - worker.refit_at >= REFIT_INTERVAL_S
        if refit:
            worker.refit_at = now
        worker.cost.time.observe(
            msg.prefill_samples, msg.decode_samples, msg.mixed_samples, refit=refit
        )
        worker.cost.kv.observe(msg.transfer_samples, msg.copy_samples)
        worker.prefix_query_tokens += msg.prefix_query_tokens
        worker.prefix_hit_tokens += msg.prefix_hit_tokens
        if batch is None:
            return
        d = batch.dispatch
        self.batch_records.append(
            p.BatchRecord(
                batch_id=msg.batch_id,
                worker_id=worker.worker_id,
                policy=self.policy.name,
                num_requests=batch.num_requests,
                padded_len=d.padded_len,
                steps=msg.steps,
                max_steps=d.max_steps,
                prefill_tokens=msg.prefill_tokens,
                pad_tokens=msg.pad_tokens,
                invalid_tokens=msg.invalid_tokens,
                recomputed_tokens=msg.recomputed_tokens,
                reused_kv_tokens=msg.reused_kv_tokens,
                generated_tokens=msg.generated_tokens,
                predicted_s=d.predicted_s,
                measured_s=msg.measured_s,
                predicted_peak_bytes=d.predicted_peak_bytes,
                measured_peak_bytes=msg.measured_peak_bytes,
                early_return=msg.steps < d.max_steps,
                handoff_tokens=msg.handoff_tokens,
                handoff_bytes=msg.handoff_bytes,
                restored_tokens=msg.restored_tokens,
            )
        )

    def on_worker_failed(self, worker: WorkerState, msg: p.WorkerFailed, now: float) -> None:
        """The worker's compute loop failed and it is exiting: serve its requests elsewhere now
        rather than after the heartbeat timeout."""
        self.log(now, "error", f"worker {worker.worker_id} failed: {msg.message}")
        self.remove_worker(worker.worker_id, now, reason="compute loop failed")

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self, now: float) -> list[Dispatch]:
        """Ask the policy while requests wait, or run (a policy may renew running slices)."""
        if not self.waiting and not any(w.batches for w in self.workers.values()):
            return []
        views = [self._worker_view(w) for w in self.workers.values() if not w.draining]
        if not views:
            return []
        waiting = [self._waiting_view(r) for r in self.waiting.values()]
        plan = self.policy.schedule(waiting, views, now)
        applied = []
        seen: set[str] = set()
        for dispatch in plan:
            if self._check(dispatch, seen):
                self._apply(dispatch, now)
                applied.append(dispatch)
        return applied

    def _check(self, d: Dispatch, seen: set[str]) -> bool:
        """The broker checks every plan (broker/plan_check.py); a wrong dispatch is dropped."""
        problems = plan_problems(d, self.workers, self.requests, self.waiting, seen)
        if problems:
            log.error(
                "policy %s produced an invalid dispatch (%s); dropped",
                self.policy.name,
                "; ".join(problems),
            )
            return False
        seen.update(d.request_ids)
        return True

    def _missed_renewals(self, req: Request, num_generated: int) -> None:
        """Renewals that reached the worker after the slice they extended had ended did not
        happen: they are not counted as slices."""
        missed = sum(1 for budget in req.renewed_from if budget >= num_generated)
        req.num_slices -= missed
        self.num_renewals -= missed
        req.renewed_from.clear()

    def _renew(self, d: Dispatch) -> None:
        """Extend running requests' slices: each by up to ``d.max_steps`` more steps."""
        renewals = []
        for request_id in d.request_ids:
            req = self.requests[request_id]
            done = len(req.generated) - req.generated_at_dispatch
            left = req.dispatch_steps - done
            req.renewed_from.append(req.dispatch_steps)
            req.dispatch_steps += max(0, min(d.max_steps, req.max_new_tokens - left))
            req.num_slices += 1
            renewals.append((request_id, req.dispatch_steps))
        self.num_renewals += len(renewals)
        worker = self.workers[d.worker_id]
        worker.running_view = None  # their slices grew
        self._send(worker, p.Renew(renewals=renewals))

    def _apply(self, d: Dispatch, now: float) -> None:
        if d.renew:
            self._renew(d)
            return
        worker = self.workers[d.worker_id]
        batch_id = next(self._batch_ids)
        keep_kv = self.cfg.kv_mode != "recompute"
        items = []
        for request_id in d.request_ids:
            req = self.waiting.pop(request_id)
            kv_source = self._kv_source(req.request_id, d)
            req.state = RequestState.RUNNING
            req.worker_id, req.batch_id = d.worker_id, batch_id
            req.num_slices += 1
            req.generated_at_dispatch = len(req.generated)
            if req.first_dispatched_at is None:
                req.first_dispatched_at = now
            req.dispatch_steps = min(d.max_steps, req.max_new_tokens)
            req.renewed_from.clear()
            items.append(req.batch_item(req.dispatch_steps, keep_kv))
            items[-1].kv_source = kv_source
        batch = BatchState(batch_id, d.worker_id, d, set(d.request_ids), now, len(d.request_ids))
        worker.add_batch(batch, now)
        self._send(
            worker,
            p.RunBatch(
                batch_id=batch_id,
                items=items,
                join=d.join,
                predicted_s=d.predicted_s,
                predicted_peak_bytes=d.predicted_peak_bytes,
                max_steps=d.max_steps,
                session=worker.session,
            ),
        )

    def _kv_source(self, request_id: str, d: Dispatch) -> str:
        """The peer address the worker of ``d`` pulls the request's parked KV from, when the
        policy chose a handoff (""; KV left elsewhere is freed there: it recomputes)."""
        handoff = request_id in d.handoff_ids
        source_id, commands = self.kv.dispatched(request_id, d.worker_id, handoff)
        self._send_all(commands)
        source = self.workers.get(source_id) if source_id else None
        return source.ready.peer_addr if source is not None else ""

    def _worker_view(self, worker: WorkerState) -> WorkerView:
        return worker_view(worker, self.requests, self.kv)

    def _waiting_view(self, req: Request) -> WaitingRequest:
        cached: Mapping[str, int] = {}
        if self.cfg.prefix_placement:  # looked up only if the policy reads them
            cached = self.prefix.for_request(req.request_id, lambda: req.prompt_ids + req.generated)
        return waiting_view(req, self.kv, cached)

    # -- request lifecycle -----------------------------------------------------------------

    def _append_tokens(
        self, req: Request, token_ids: list[int], now: float, worker: WorkerState | None
    ) -> None:
        """``worker``: the state of the worker ``req`` runs on (None: it is gone)."""
        if req.first_token_at is None:
            req.first_token_at = now
        generated = req.generated
        self.journal.tokens(req.request_id, len(generated), token_ids)
        generated.extend(token_ids)
        batch = worker.batches.get(req.batch_id) if worker is not None else None
        if batch is not None:
            batch.step = max(batch.step, len(generated) - req.generated_at_dispatch)
        delta = req.text.add(generated)
        if req.stream and (delta or token_ids):
            self.outbox.append(
                ToClient(
                    req.client_id,
                    p.Delta(request_id=req.request_id, text=delta, token_ids=token_ids),
                )
            )
        if req.text.stopped:
            self._finish(req, "stop", now, RequestState.FINISHED)

    def _requeue(self, req: Request, now: float) -> None:
        req.state = RequestState.WAITING
        req.worker_id = req.batch_id = None
        req.waiting_since = now
        self.waiting[req.request_id] = req

    def _finish(
        self,
        req: Request,
        reason: p.FinishReason,
        now: float,
        state: RequestState,
        notify: bool = True,
    ) -> None:
        if req.state is RequestState.RUNNING and req.worker_id in self.workers:
            self._send(self.workers[req.worker_id], p.Abort(request_ids=[req.request_id]))
        req.state = state
        req.finished_at = now
        log_request_end(req, reason)
        tail = req.text.finish()
        if notify and req.stream and tail:
            self.outbox.append(
                ToClient(req.client_id, p.Delta(request_id=req.request_id, text=tail, token_ids=[]))
            )
        finished = req.finished_message(reason)
        if notify:
            self.outbox.append(ToClient(req.client_id, finished))
        if state is RequestState.FINISHED:  # a resubmission is answered from here
            entry = FinishedEntry(req.fingerprint, req.owner, len(req.prompt_ids), finished)
            self.finished_cache.add(entry)
            self.journal.finished(finished)
        else:
            self.journal.ended(req.request_id)
        self._forget(req)
        self.num_finished += state is RequestState.FINISHED

    def _fail(self, req: Request, code: str, message: str, now: float) -> None:
        req.state = RequestState.FAILED
        req.finished_at = now
        log_request_end(req, "error", code=code)
        self.journal.ended(req.request_id)
        self.outbox.append(
            ToClient(req.client_id, p.Error(code=code, message=message, request_id=req.request_id))
        )
        self._forget(req)
        self.num_failed += 1

    def _forget(self, req: Request) -> None:
        self.prefix.forget(req.request_id)
        if self.requests.pop(req.request_id, None) is not None:
            self.num_queued_tokens -= req.queued_tokens
        self.waiting.pop(req.request_id, None)
        self._send_all(self.kv.forget(req.request_id))
        self.expiry.adopt(req.request_id)
        if req.worker_id in self.workers:
            batch = self.workers[req.worker_id].batches.get(req.batch_id)
            if batch is not None:
                batch.request_ids.discard(req.request_id)
                self.workers[req.worker_id].running_view = None
        self.done.append(req)

    def _send_all(self, commands: list[tuple[str, p.DropKV]]) -> None:
        for worker_id, msg in commands:
            if worker_id in self.workers:
                self._send(self.workers[worker_id], msg)

    def _send(
        self, worker: WorkerState, msg: p.RunBatch | p.Renew | p.Abort | p.DropKV | p.Reset
    ) -> None:
        self.outbox.append(ToWorker(worker.worker_id, worker.identity, msg))

    def log(self, now: float, level: str, message: str) -> None:
        getattr(log, "warning" if level == "warning" else level)(message)
        self.events.append((now, level, message))
