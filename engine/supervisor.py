"""Child processes of ``serve`` and LocalEngine (workers, gateways, a supervised broker):
started with a death signal, always reaped; a broker that dies is started again.

Children run in their own session, so that a terminal's Ctrl-C reaches only the parent, which
drains first and then stops them; the death signal still ends them if the parent dies.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from engine.config import BrokerConfig

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
RUN_PY = Path(__file__).resolve().parent.parent / "run.py"


def _die_with_parent(parent_pid: int) -> None:  # runs in the child between fork and exec (Linux)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return  # not Linux: the parent's stop_all() still reaps children on a normal exit
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody will signal us
        os._exit(1)


def spawn(argv: Sequence[str], stdout: int | None = None) -> subprocess.Popen:
    """Start ``python -m engine.cli ARGV`` as a child that gets SIGTERM if this thread's process
    dies (Linux ties the signal to the spawning thread: spawn from a long-lived thread)."""
    cmd = [sys.executable, "-m", "engine.cli", *argv]
    return subprocess.Popen(
        cmd,
        preexec_fn=functools.partial(_die_with_parent, os.getpid()),  # noqa: PLW1509
        cwd=RUN_PY.parent,
        start_new_session=True,
        stdout=stdout,
    )


def stop_all(procs: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM every child, wait, then SIGKILL what is left; never leaves a zombie."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()


class SupervisedBroker:
    """`run.py broker` as a child process with ``cfg``, restarted when it dies (at most
    ``max_restarts`` times in a row, each logged, after a short backoff), on the addresses it
    bound first and the same journal; its workers are not touched: they rejoin by themselves.

    A supervising thread spawns every broker process (the death signal is tied to the thread
    that spawns), so it lives as long as this object. ``failure`` says why it gave up."""

    STABLE_S = 30.0  # a broker that ran this long before dying starts the count again

    def __init__(
        self, cfg: BrokerConfig, log_args: Sequence[str] = (), max_restarts: int = 5
    ) -> None:
        self.cfg = cfg
        self.log_args = list(log_args)
        self.max_restarts = max_restarts
        self.addresses: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.num_restarts = 0
        self.failure: str | None = None
        self.ready = threading.Event()  # addresses known (or a failure)
        self.exited = threading.Event()  # no broker will run any more
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._supervise, name="broker-supervisor", daemon=True
        )

    def start(self, timeout_s: float) -> dict[str, str]:
        self._thread.start()
        if not self.ready.wait(timeout_s) and self.failure is None:
            self.failure = f"the broker did not start within {timeout_s:.0f} s"
        if self.failure is not None:
            self.stop()
            raise BrokerExited(self.failure)
        return self.addresses

    def _spawn(self) -> subprocess.Popen:
        config = msgspec.json.encode(self.cfg).decode()
        proc = spawn(["broker", "--config-json", config, *self.log_args], stdout=subprocess.PIPE)
        threading.Thread(target=self._read_stdout, args=(proc,), daemon=True).start()
        return proc

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        """The broker's first line names its addresses; anything else goes to our stdout."""
        for line in proc.stdout:
            found = _ADDRESSES.match(line.decode(errors="replace").strip())
            if found is None:
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
                continue
            self.addresses = dict(zip(("clients", "workers", "stats"), found.groups(), strict=True))
            if not self.ready.is_set():  # later starts bind the same addresses
                self.cfg = dataclasses.replace(
                    self.cfg, client_addr=found[1], worker_addr=found[2], stats_addr=found[3]
                )
            self.ready.set()
        proc.stdout.close()

    def _supervise(self) -> None:
        num_failures = 0
        try:
            while not self._stopping.is_set():
                started_at = time.monotonic()
                self.proc = self._spawn()
                code = self.proc.wait()
                ran_s = time.monotonic() - started_at
                if self._stopping.is_set() or code == 0:
                    return
                if not self.ready.is_set():
                    self.failure = f"the broker exited ({exit_text(code)}) before it was ready: see its message above"
                    return
                num_failures = num_failures + 1 if ran_s < self.STABLE_S else 1
                if num_failures > self.max_restarts:
                    self.failure = (
                        f"the broker died {num_failures} times in a row ({exit_text(code)} the last "
                        f"time): not restarting it again; see its messages above"
                    )
                    log.error("%s", self.failure)
                    return
                delay_s = 0.0 if num_failures == 1 else min(8.0, 2.0 ** (num_failures - 2))
                self.num_restarts += 1
                log.warning(
                    "the broker died (%s) after %.1f s; restarting it in %.0f s on the same "
                    "addresses%s (restart %d in a row, at most %d)", exit_text(code), ran_s, delay_s,
                    " and journal" if self.cfg.journal_path else ", without a journal: its requests are lost",
                    num_failures, self.max_restarts,
                )  # fmt: skip
                self._stopping.wait(delay_s)
        finally:
            self.ready.set()
            self.exited.set()

    def stop_supervising(self) -> None:
        """From now on a broker that exits is not started again (serve drains it)."""
        self._stopping.set()

    def signal(self, sig: int) -> None:
        """Pass a signal to the running broker (SIGTERM: drain; a second one: stop now)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def stop(self, drain_s: float | None = None) -> None:
        """Stop supervising and stop the broker: drain for at most ``drain_s`` (None: stop at
        once: it answers its live requests ``shutting_down``), then kill what is left."""
        self._stopping.set()
        self.signal(signal.SIGTERM)
        if drain_s is None:
            time.sleep(0.05)  # two pending signals may be taken as one
            self.signal(signal.SIGINT)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=(drain_s or 0.0) + 10.0)
            except subprocess.TimeoutExpired:
                log.warning("the broker ignored SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)


class BrokerExited(RuntimeError):
    """The supervised broker could not start, or died too often; the message says why."""


_ADDRESSES = re.compile(r"broker: clients (\S+), workers (\S+), stats (\S+)")


def exit_text(code: int) -> str:
    """How a process ended, for a log line: "exit status 1", "killed by SIGKILL"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
