"""The worker process: a ZeroMQ I/O loop (main thread) around the executor (compute thread).

The main thread owns the DEALER socket to the broker: it forwards commands to the compute
thread, sends what the compute thread produced, and sends heartbeats even while a long prefill
runs (the ``progress`` counter in them tells a hung compute loop from a busy one). It also keeps
the worker's session with the broker (docs/PROTOCOL.md, section 11): on Reset, or when the
broker goes silent, the compute thread swaps in a fresh executor and the worker announces itself
again; on SIGTERM it drains.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from engine import links
from engine import protocol as p
from engine.config import WorkerConfig
from engine.curve import ClientKeys
from engine.worker.kv_reuse import KVArrived, KVFetchFailed
from engine.worker.kv_setup import attach_handoffs

log = logging.getLogger(__name__)

_OUT_ADDR = "inproc://worker-out"
# Markers on the compute thread's output pipe (an encoded message is never one of them).
_RESET_DONE = b""  # the executor was replaced: everything after this is of the new session
_DRAINED = b"\x00"  # finishing, and the executor is idle: the worker may exit
_RESET, _FINISH = object(), object()  # commands to the compute thread


class ComputeThread(threading.Thread):
    """Runs the executor: applies commands between steps, steps while there is work."""

    def __init__(
        self, ctx: zmq.Context, make_executor: Callable[[], object], step_log: StepLog | None = None
    ) -> None:
        super().__init__(name="compute", daemon=True)
        self.ctx = ctx
        self.make_executor = make_executor
        self.executor = make_executor()
        self.step_log = step_log
        self.commands: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.failed: str | None = None
        self._finishing = False

    def run(self) -> None:
        out = self.ctx.socket(zmq.PAIR)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(_OUT_ADDR)
        try:
            while not self.stopping.is_set():
                wait_s = self.executor.wait_s()  # > 0: a batch awaits handed-off KV
                self._apply_commands(out, block=wait_s != 0, timeout_s=min(wait_s or 0.05, 0.05))
                if self.executor.has_work():
                    self._step(out)
                elif self._finishing:
                    out.send(_DRAINED)
                    return
        except Exception as exc:  # a bug in the compute path: report it and stop this worker
            log.exception("compute loop failed")
            self.failed = f"{type(exc).__name__}: {exc}"
            out.send(p.encode(p.WorkerFailed(batch_id=-1, message=self.failed)))
        finally:
            out.close(linger=0)

    def _apply_commands(self, out: zmq.Socket, block: bool, timeout_s: float = 0.05) -> None:
        try:
            cmd = self.commands.get(timeout=timeout_s) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd is _RESET:
                self.executor = self.make_executor()  # the old one, its KV included, is freed
                out.send(_RESET_DONE)
            elif cmd is _FINISH:
                self._finishing = True
            elif isinstance(cmd, p.RunBatch):
                self.executor.submit(cmd)
            elif isinstance(cmd, p.Renew):
                self.executor.renew(cmd.renewals)
            elif isinstance(cmd, p.Abort):
                self.executor.abort(cmd.request_ids)
            elif isinstance(cmd, p.DropKV):
                self.executor.drop_kv(cmd.request_ids)
            elif isinstance(cmd, KVArrived | KVFetchFailed):  # from the handoff thread
                self.executor.receive_kv(cmd)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return

    def _step(self, out: zmq.Socket) -> None:
        log = self.step_log
        if log is not None:
            started_at, progress = time.perf_counter(), self.executor.progress
        result = self.executor.step()
        if result.generated is not None and result.generated.tokens:
            out.send(p.encode(result.generated))
        if result.blocks is not None:
            out.send(p.encode(result.blocks))
        for msg in result.released:
            out.send(p.encode(msg))
        if result.offloaded:
            out.send(p.encode(p.KVEvicted(request_ids=list(result.offloaded), offloaded=True)))
        if result.evicted:
            out.send(p.encode(p.KVEvicted(request_ids=list(result.evicted))))
        for msg in result.done:
            out.send(p.encode(msg))
        if log is not None and self.executor.progress != progress:
            log.write(started_at, time.perf_counter() - started_at, self.executor)


class StepLog:
    """``--step-log DIR``: one JSON line per forward in ``DIR/<worker id>.jsonl``: when the step
    began (``at``, seconds on this process's monotonic clock), its shape (decode rows and their
    mean context, prefill rows and their mean length), the forward's seconds and the whole
    step's (admission, forward, sampling and the messages out). What the simulator's
    calibration fits a device model from (engine/bench/calibrate.py)."""

    def __init__(self, directory: str, worker_id: str) -> None:
        os.makedirs(directory, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker_id)
        self.path = os.path.join(directory, f"{safe}.jsonl")
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (line-buffered; close())

    def write(self, at: float, step_s: float, executor: object) -> None:
        shape = getattr(executor, "last_shape", None)
        if shape is None:
            return
        rows, context, prefill_rows, prefill_len, forward_s = shape
        self._file.write(
            f'{{"at": {at:.6f}, "rows": {rows}, "context": {context}, '
            f'"prefill_rows": {prefill_rows}, "prefill_len": {prefill_len}, '
            f'"forward_s": {forward_s:.6f}, "step_s": {step_s:.6f}}}\n'
        )

    def close(self) -> None:
        self._file.close()


class WorkerLoop:
    """Connects to the broker, announces itself, and serves until told to stop.

    ``make_executor`` builds a fresh executor (at start and at every reset); ``probe`` returns
    (memory used, memory total, utilisation) for heartbeats.
    """

    def __init__(
        self, cfg: WorkerConfig, make_executor: Callable[[], object], ready: p.Ready, probe
    ) -> None:
        self.cfg = cfg
        self.ready = ready
        self.probe = probe
        self.session = ready.session
        self.resetting = False
        self.heard_at: float | None = None  # last frame from the broker; None: none since reset
        self.drain_deadline: float | None = None
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PAIR)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(_OUT_ADDR)
        self.broker = self.ctx.socket(zmq.DEALER)
        self.broker.setsockopt(zmq.LINGER, 0)
        links.worker_link(self.broker)
        if cfg.curve_secret_key:
            ClientKeys.load(cfg.curve_secret_key, cfg.curve_server_key or "").apply(self.broker)
        self.broker.connect(cfg.connect)
        self.step_log = StepLog(cfg.step_log, ready.worker_id) if cfg.step_log else None
        self.compute = ComputeThread(self.ctx, make_executor, self.step_log)
        self.handoffs, self.ready = attach_handoffs(self.ctx, self.compute, ready, cfg)

    @property
    def executor(self):
        return self.compute.executor

    def serve(self, stop: threading.Event | None = None, abort: threading.Event | None = None):
        """Serve until Shutdown, ``abort``, or, once ``stop`` is set, the end of a drain."""
        stop, abort = stop or threading.Event(), abort or threading.Event()
        self.compute.start()
        self.handoffs.start()
        self.broker.send(p.encode(self.ready))
        poller = zmq.Poller()
        poller.register(self.broker, zmq.POLLIN)
        poller.register(self.inbox, zmq.POLLIN)
        next_beat_at = 0.0
        try:
            while not abort.is_set() and self.compute.is_alive():
                if stop.is_set() and self.drain_deadline is None:
                    if self.heard_at is None:  # no broker since start or reset: no work here
                        log.info("stopping: no broker has answered, so nothing is running here")
                        break
                    self._start_drain()
                events = dict(poller.poll(timeout=100))
                if self.inbox in events and not self._forward_outputs():
                    break  # drained
                if self.broker in events and not self._take_commands():
                    break
                now = time.monotonic()
                if not self._broker_alive(now) or self._drain_overdue(now):
                    break
                if now >= next_beat_at and not self.resetting:
                    self._heartbeat()
                    next_beat_at = now + self.cfg.heartbeat_interval_s
            self._forward_outputs()
        finally:
            self.compute.stopping.set()
            self.handoffs.stop()
            self.compute.join(timeout=5.0)
            self.handoffs.join(timeout=2.0)
            if self.step_log is not None and not self.compute.is_alive():
                self.step_log.close()
            # Let the last messages (releases, a WorkerFailed) reach the broker, briefly.
            self.ctx.destroy(linger=0 if abort.is_set() else 1000)

    def _forward_outputs(self) -> bool:
        """Send what the compute thread produced; False once it has drained."""
        while True:
            try:
                frame = self.inbox.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return True
            if frame == _RESET_DONE:
                self.resetting = False
                log.info("worker reset; announcing session %d to the broker", self.session)
                self.broker.send(
                    p.encode(msgspec.structs.replace(self.ready, session=self.session))
                )
            elif frame == _DRAINED:
                return False
            else:
                self.broker.send(frame)

    def _take_commands(self) -> bool:
        """Hand commands to the compute thread; False when told to shut down."""
        while True:
            try:
                frame = self.broker.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                msg = p.decode_to_worker(frame)
            except p.ProtocolError as exc:
                log.error("dropped an undecodable broker frame: %s", exc.message)
                continue
            self.heard_at = time.monotonic()
            if isinstance(msg, p.Shutdown):
                log.info("broker asked this worker to shut down")
                return False
            if isinstance(msg, p.Ping):
                if msg.draining and self.drain_deadline is not None:
                    self.compute.commands.put(_FINISH)  # nothing more will be dispatched here
            elif isinstance(msg, p.Reset):
                if msg.session == self.session and not self.resetting:
                    self._reset(f"the broker asked: {msg.reason}")
            elif isinstance(msg, p.RunBatch) and (msg.session != self.session or self.resetting):
                log.info(
                    "dropped batch %d of session %d (now %d)",
                    msg.batch_id,
                    msg.session,
                    self.session,
                )
            else:
                self.compute.commands.put(msg)
                if isinstance(msg, p.RunBatch):
                    self.handoffs.fetch_for(msg)  # after the batch: its arrivals follow it

    def _reset(self, reason: str) -> None:
        """Swap in a fresh executor (in the compute thread, between steps); Ready follows."""
        log.warning(
            "resetting this worker (session %d -> %d): %s", self.session, self.session + 1, reason
        )
        self.session += 1
        self.resetting = True
        self.compute.commands.put(_RESET)

    def _broker_alive(self, now: float) -> bool:
        """After broker_timeout_s of silence: reset and announce again (False if draining:
        there is nobody to hand work back to, so leave)."""
        if self.heard_at is None or now - self.heard_at <= self.cfg.broker_timeout_s:
            return True
        self.heard_at = None  # once per silence
        if self.drain_deadline is not None:
            log.warning("the broker went silent while this worker drained; leaving")
            return False
        if not self.resetting:
            self._reset(f"no word from the broker for {self.cfg.broker_timeout_s:g} s")
        return True

    def _start_drain(self) -> None:
        self.drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
        log.info(
            "draining: finishing this worker's batches (at most %.0f s)", self.cfg.drain_timeout_s
        )
        self.broker.send(p.encode(p.Draining(deadline_s=self.cfg.drain_timeout_s)))

    def _drain_overdue(self, now: float) -> bool:
        if self.drain_deadline is None or now < self.drain_deadline:
            return False
        log.warning("drain deadline passed: leaving; the broker requeues what was still running")
        return True

    def _heartbeat(self) -> None:
        mem_used, _total, util = self.probe()
        executor = self.executor
        self.broker.send(
            p.encode(
                p.Heartbeat(
                    progress=executor.progress,
                    kv_used_bytes=executor.kv_used_bytes,
                    kv_parked_bytes=executor.kv_parked_bytes,
                    kv_host_bytes=executor.kv_host_bytes,
                    mem_used_bytes=mem_used,
                    util_percent=util,
                    session=self.session,
                )
            )
        )


def default_worker_id(device: str) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{device.replace(':', '')}"
