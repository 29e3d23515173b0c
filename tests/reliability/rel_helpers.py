"""Engines and a recording raw client for the reliability tests (real processes, loopback)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgpack
import zmq

from engine.config import BrokerConfig, SchedulerConfig
from engine.launcher import LocalEngine

ANY_PORT = "tcp://127.0.0.1:*"


def worker_args(model_dir, kv_budget: str = "64MiB") -> list[str]:
    return ["--model", str(model_dir), "--threads", "1", "--no-profile", "--kv-budget", kv_budget]


@contextlib.contextmanager
def engine(
    model_dir,
    worker_ids=("w1", "w2"),
    sched: dict | None = None,
    extra_worker_args: tuple[str, ...] = (),
    **broker,
) -> Iterator[LocalEngine]:
    """A broker thread plus one worker process per id in ``worker_ids`` (``--worker-id``)."""
    sched = {"policy": "scls", "slice_len": 8, "max_gen_len": 256, **(sched or {})}
    cfg = BrokerConfig(
        client_addr=ANY_PORT, worker_addr=ANY_PORT, stats_addr=ANY_PORT, model=str(model_dir),
        stats_interval_s=0.1, scheduler=SchedulerConfig(**sched),
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, **broker)
    eng = LocalEngine(cfg, num_workers=0, worker_args=worker_args(model_dir), start_timeout_s=90)
    eng.start()
    try:
        for worker_id in worker_ids:
            eng.add_worker(["--worker-id", worker_id, *extra_worker_args])
        eng.wait_for_workers(len(worker_ids))
        yield eng
    finally:
        eng.stop()


def worker_proc(eng: LocalEngine, worker_id: str) -> subprocess.Popen:
    """The process started with ``--worker-id worker_id`` (the newest one)."""
    return [p for p in eng.procs if worker_id in p.args][-1]


def kill(eng: LocalEngine, proc: subprocess.Popen) -> None:
    """SIGKILL a worker process and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    eng.procs.remove(proc)


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, step_s=0.005):
    """Poll ``predicate`` (state owned by another thread or process) until truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except RuntimeError:  # a dict of the broker thread changed size while we read it
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(step_s)


@dataclass
class Record:
    """Every reply of one request, as received."""

    accepted: list[dict] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # from Deltas, in order
    text: str = ""
    finished: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return bool(self.finished or self.errors)


class RawClient:
    """A DEALER speaking docs/PROTOCOL.md with msgpack, recording every reply by request id."""

    def __init__(self, ctx: zmq.Context, addr: str, rcvhwm: int | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if rcvhwm is not None:
            self.sock.rcvhwm = rcvhwm
        self.sock.connect(addr)
        self.records: dict[str, Record] = {}
        self.unrouted: list[dict] = []

    def submit(self, request_id: str, **fields) -> None:
        self.records.setdefault(request_id, Record())
        self.sock.send(msgpack.packb({"type": "submit", "request_id": request_id, **fields}))

    def send(self, msg: dict) -> None:
        self.sock.send(msgpack.packb(msg))

    def pump(self, timeout_ms: int = 10) -> int:
        """Receive what arrived (waiting at most ``timeout_ms`` for the first); returns count."""
        count = 0
        while self.sock.poll(timeout_ms if count == 0 else 0):
            self._record(msgpack.unpackb(self.sock.recv()))
            count += 1
        return count

    def _record(self, msg: dict) -> None:
        rec = self.records.get(msg.get("request_id") or "")
        if rec is None:
            self.unrouted.append(msg)
        elif msg["type"] == "accepted":
            rec.accepted.append(msg)
        elif msg["type"] == "delta":
            rec.tokens += msg["token_ids"]
            rec.text += msg["text"]
        elif msg["type"] == "finished":
            rec.finished.append(msg)
        elif msg["type"] == "error":
            rec.errors.append(msg)

    def wait(self, ids, timeout_s: float, on_tick: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(self.records[i].ended for i in ids):
            if time.monotonic() > deadline:
                left = [i for i in ids if not self.records[i].ended]
                raise AssertionError(f"{len(left)} requests did not end, e.g. {left[:3]}")
            self.pump(10)
            if on_tick is not None:
                on_tick()
        self.pump(50)  # anything that would come after the end (a duplicate) is caught too

    def close(self) -> None:
        self.sock.close(linger=0)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def children_of(pid: int) -> set[int]:
    """Direct and indirect child processes, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, par in parents.items() if par in frontier} - found
        found |= frontier
    return found
