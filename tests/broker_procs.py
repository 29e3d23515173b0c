"""A broker process that a test can SIGKILL and start again on the same ports, beside worker
processes that rejoin it by themselves: real processes, loopback, every child reaped."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
START_TIMEOUT_S = 60.0


def free_port_triple() -> int:
    """A port P with P, P+1 and P+2 free now (the broker's client, worker and stats ports)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 65530:
            continue
        socks = [socket.socket() for _ in range(3)]
        try:
            for i, sock in enumerate(socks):
                sock.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("found no three consecutive free ports")


class BrokerProcs:
    """``run.py broker`` on fixed ports (started, killed and started again at will) and
    ``run.py worker`` processes connected to it. ``log_dir`` keeps each process's stderr."""

    def __init__(self, model_dir: Path, log_dir: Path, broker_args: tuple[str, ...] = ()) -> None:
        self.model = str(model_dir)
        self.log_dir = log_dir
        self.broker_args = broker_args
        self.journal = "--journal" in broker_args
        self.port = free_port_triple()
        self.client_addr = f"tcp://127.0.0.1:{self.port}"
        self.worker_addr = f"tcp://127.0.0.1:{self.port + 1}"
        self.stats_addr = f"tcp://127.0.0.1:{self.port + 2}"
        self.broker: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._num_logs = 0

    def _log(self, name: str):
        self._num_logs += 1
        return open(self.log_dir / f"{self._num_logs:02d}-{name}.log", "wb")  # noqa: SIM115

    def logs(self, name: str) -> str:
        """What every process called ``name`` ("broker", "worker") wrote to stderr so far."""
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob(f"*-{name}.log"))
        )

    def start_broker(self) -> None:
        """Start the broker and return once it has bound its sockets."""
        assert self.broker is None
        args = ["broker", "--model", self.model, "--port", str(self.port), *self.broker_args]
        with self._log("broker") as err:
            self.broker = subprocess.Popen(
                [sys.executable, str(RUN_PY), *args], stdout=subprocess.PIPE, stderr=err
            )
        _wait_for_line(self.broker, b"broker: clients", START_TIMEOUT_S)

    def kill_broker(self) -> None:
        """SIGKILL the broker (no drain, nothing written on the way out) and reap it."""
        assert self.broker is not None
        os.kill(self.broker.pid, signal.SIGKILL)
        self.broker.wait(timeout=10)
        self.broker.stdout.close()
        self.broker = None

    def start_worker(self) -> None:
        args = ["worker", "--connect", self.worker_addr, "--model", self.model, "--threads", "1"]
        args += ["--no-profile", "--kv-budget", "64MiB"]
        with self._log("worker") as err:
            self.workers.append(
                subprocess.Popen(
                    [sys.executable, str(RUN_PY), *args], stdout=subprocess.DEVNULL, stderr=err
                )
            )

    def close(self) -> None:
        for proc in [*self.workers, *([self.broker] if self.broker else [])]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        self.workers, self.broker = [], None


def _wait_for_line(proc: subprocess.Popen, prefix: bytes, timeout_s: float) -> bytes:
    """The first stdout line of ``proc`` that starts with ``prefix``."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{proc.args[2]} exited ({proc.wait()}) before {prefix!r}")
            if line.startswith(prefix):
                return line
    raise TimeoutError(f"{proc.args[2]} printed no {prefix!r} within {timeout_s} s")


def wait_for_workers(client, num_workers: int, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the broker ``client`` talks to counts ``num_workers`` workers (asked every 0.1 s)."""
    deadline = time.monotonic() + timeout_s
    while client.stats(timeout_s=timeout_s).num_workers < num_workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {num_workers} workers joined within {timeout_s} s")
        time.sleep(0.1)
