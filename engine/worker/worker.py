"""The worker process: a ZeroMQ I/O loop (main thread) around the executor (compute thread).

The main thread owns the DEALER socket to the broker: it forwards commands to the compute
thread, sends what the compute thread produced, and sends heartbeats even while a long prefill
runs (the ``progress`` counter in them tells a hung compute loop from a busy one).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time

import zmq

from engine import protocol as p
from engine.config import WorkerConfig

log = logging.getLogger(__name__)

_OUT_ADDR = "inproc://worker-out"


class ComputeThread(threading.Thread):
    """Runs the executor: applies commands between steps, steps while there is work."""

    def __init__(self, ctx: zmq.Context, executor) -> None:
        super().__init__(name="compute", daemon=True)
        self.ctx = ctx
        self.executor = executor
        self.commands: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.failed: str | None = None

    def run(self) -> None:
        out = self.ctx.socket(zmq.PAIR)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(_OUT_ADDR)
        try:
            while not self.stopping.is_set():
                self._apply_commands(block=not self.executor.has_work())
                if self.executor.has_work():
                    self._step(out)
        except Exception as exc:  # a bug in the compute path: report it and stop this worker
            log.exception("compute loop failed")
            self.failed = f"{type(exc).__name__}: {exc}"
            out.send(p.encode(p.WorkerFailed(batch_id=-1, message=self.failed)))
        finally:
            out.close(linger=0)

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self.commands.get(timeout=0.05) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(cmd, p.RunBatch):
                self.executor.submit(cmd)
            elif isinstance(cmd, p.Abort):
                self.executor.abort(cmd.request_ids)
            elif isinstance(cmd, p.DropKV):
                self.executor.drop_kv(cmd.request_ids)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return

    def _step(self, out: zmq.Socket) -> None:
        result = self.executor.step()
        if result.generated is not None and result.generated.tokens:
            out.send(p.encode(result.generated))
        for msg in result.released:
            out.send(p.encode(msg))
        if result.evicted:
            out.send(p.encode(p.KVEvicted(request_ids=list(result.evicted))))
        for msg in result.done:
            out.send(p.encode(msg))


class WorkerLoop:
    """Connects to the broker, announces itself, and serves until told to stop."""

    def __init__(self, cfg: WorkerConfig, executor, ready: p.Ready, probe) -> None:
        self.cfg = cfg
        self.ready = ready
        self.probe = probe
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PAIR)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(_OUT_ADDR)
        self.broker = self.ctx.socket(zmq.DEALER)
        self.broker.setsockopt(zmq.LINGER, 0)
        self.broker.setsockopt(zmq.TCP_KEEPALIVE, 1)
        self.broker.connect(cfg.connect)
        self.compute = ComputeThread(self.ctx, executor)
        self.executor = executor

    def serve(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.compute.start()
        self.broker.send(p.encode(self.ready))
        poller = zmq.Poller()
        poller.register(self.broker, zmq.POLLIN)
        poller.register(self.inbox, zmq.POLLIN)
        next_beat_at = 0.0
        try:
            while not stop.is_set() and self.compute.is_alive():
                events = dict(poller.poll(timeout=100))
                if self.inbox in events:
                    self._forward_outputs()
                if self.broker in events and not self._take_commands():
                    break
                if time.monotonic() >= next_beat_at:
                    self._heartbeat()
                    next_beat_at = time.monotonic() + self.cfg.heartbeat_interval_s
            self._forward_outputs()
        finally:
            self.compute.stopping.set()
            self.compute.join(timeout=5.0)
            self.ctx.destroy(linger=0)

    def _forward_outputs(self) -> None:
        while True:
            try:
                frame = self.inbox.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
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
            if isinstance(msg, p.Shutdown):
                log.info("broker asked this worker to shut down")
                return False
            self.compute.commands.put(msg)

    def _heartbeat(self) -> None:
        mem_used, _total, util = self.probe()
        self.broker.send(
            p.encode(
                p.Heartbeat(
                    progress=self.executor.progress,
                    kv_used_bytes=self.executor.kv_used_bytes,
                    kv_parked_bytes=self.executor.kv_parked_bytes,
                    mem_used_bytes=mem_used,
                    util_percent=util,
                )
            )
        )


def default_worker_id(device: str) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{device.replace(':', '')}"
