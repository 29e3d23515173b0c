"""Fuzz a running broker (a real process, with a real worker): more than 100,000 malformed and
hostile frames from hypothesis strategies, sent in bulk; then it must still serve a real request
with the same answer as before, and its memory must not have grown without bound."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from frames import KINDS, make_frames
from frames import frames as frame_strategy
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from rel_helpers import rss_bytes

from engine import protocol as p
from engine.client import Client
from engine.supervisor import RUN_PY, stop_all

pytestmark = pytest.mark.timeout(240)
FRAMES_PER_EXAMPLE = 250
NUM_EXAMPLES = 410  # 102,500 frames


class Broker:
    """``run.py broker`` and one ``run.py worker`` as child processes (port 0: free ports)."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "engine.cli", "--log-level", "WARNING", "broker"]
        args = ["--model", str(model_dir), "--port", "0", "--slice-len", "8", "--max-gen-len", "64"]
        self.broker = subprocess.Popen(
            cmd + args, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=RUN_PY.parent
        )
        line = self.broker.stdout.readline()  # "broker: clients ADDR, workers ADDR, stats ADDR"
        assert line.startswith("broker:"), line
        parts = dict(item.strip().split(" ", 1) for item in line[len("broker:") :].split(","))
        self.client_addr, self.worker_addr = parts["clients"], parts["workers"]
        worker = [sys.executable, "-m", "engine.cli", "--log-level", "WARNING", "worker"]
        worker += ["--connect", self.worker_addr, "--model", str(model_dir), "--threads", "1"]
        worker += ["--no-profile", "--kv-budget", "64MiB", "--worker-id", "fw"]
        self.worker = subprocess.Popen(worker, stderr=self.log, cwd=RUN_PY.parent)

    def stop(self) -> None:
        stop_all([self.worker, self.broker], timeout_s=20)
        self.log.close()


@pytest.fixture(scope="module")
def broker(tiny_model_dir, tmp_path_factory) -> Iterator[Broker]:
    b = Broker(tiny_model_dir, tmp_path_factory.mktemp("fuzz") / "engine.log")
    try:
        yield b
    finally:
        b.stop()


class Thrower:
    """Sends frames without waiting for replies, reading whatever replies came in between."""

    def __init__(self, ctx: zmq.Context, addr: str) -> None:
        self.ctx, self.addr = ctx, addr
        self.sock = self._connect()
        self.num_sent = self.num_replies = 0

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.addr)
        return sock

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            while True:
                try:
                    self.sock.send(frame, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    self.drain(timeout_ms=5)
            self.num_sent += 1
        self.drain(0)

    def send_raw(self, parts: list[bytes]) -> None:
        """A multipart message, or anything else on a throwaway connection."""
        sock = self._connect()
        sock.send_multipart(parts)
        self.num_sent += 1
        sock.close(linger=200)

    def drain(self, timeout_ms: int) -> None:
        while self.sock.poll(timeout_ms):
            self.sock.recv()
            self.num_replies += 1
            timeout_ms = 0

    def close(self) -> None:
        self.sock.close(linger=0)


def test_broker_survives_100k_hostile_frames(broker, tiny_model_dir):
    with Client(broker.client_addr, timeout_s=60) as client:  # a worker joined; a reference
        before = client.generate(prompt_ids=[5, 6, 7, 8], max_tokens=12, ignore_eos=True)
    with zmq.Context() as ctx:
        thrower = Thrower(ctx, broker.client_addr)
        try:
            _throw(thrower, NUM_EXAMPLES // 10, 1)  # warm-up: allocator pools, caches, tables
            rss_warm = rss_bytes(broker.broker.pid)
            _throw(thrower, NUM_EXAMPLES // 2 - NUM_EXAMPLES // 10, 2)
            rss_half = rss_bytes(broker.broker.pid)
            for parts in ([b"a", b"b"], [b"", b"", b""], [b"x" * (p.MAX_CLIENT_FRAME_BYTES + 1)]):
                thrower.send_raw(parts)  # extra frames; one over the size limit (disconnected)
            _throw(thrower, NUM_EXAMPLES - NUM_EXAMPLES // 2, 3)
            thrower.drain(500)
            rss_end = rss_bytes(broker.broker.pid)
        finally:
            thrower.close()
    assert broker.broker.poll() is None, "the broker died"
    with Client(broker.client_addr, timeout_s=60) as client:
        after = client.generate(prompt_ids=[5, 6, 7, 8], max_tokens=12, ignore_eos=True)
        stats = client.stats()
    assert after.token_ids == before.token_ids
    assert stats.num_workers == 1
    log = Path(broker.log.name).read_text()
    crashes = log.count("Traceback") + log.count("failed to handle a frame")
    assert crashes == 0, log[-3000:]
    assert thrower.num_sent >= 100_000
    growth_mib, late_growth_mib = (rss_end - rss_warm) / 2**20, (rss_end - rss_half) / 2**20
    assert growth_mib < 48 and late_growth_mib < 16, (growth_mib, late_growth_mib)
    print(
        f"\nFIGURES fuzz: {thrower.num_sent:,} frames, {thrower.num_replies:,} replies, crashes "
        f"{crashes}, broker RSS {rss_warm / 2**20:.0f} -> {rss_half / 2**20:.0f} -> "
        f"{rss_end / 2**20:.0f} MiB (warm, half, end)"
    )


def _throw(thrower: Thrower, num_examples: int, phase: int) -> None:
    @seed(phase)  # reproducible, and different frames in each phase
    @settings(
        max_examples=num_examples,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(KINDS), st.integers(0, 2**32 - 1), st.lists(frame_strategy, max_size=4))
    def throw(kind: str, frames_seed: int, native: list[bytes]) -> None:
        thrower.send(make_frames(kind, frames_seed, FRAMES_PER_EXAMPLE) + native)

    throw()
