"""Liveness: a stopped worker process is detected within ~3 s and rejoins by itself when it
continues; a hung compute loop (its I/O thread still heartbeating) is told apart from a long but
legitimate prefill by the progress counter and the cost model's prediction."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import msgspec
import pytest
import zmq
from rel_helpers import RawClient, engine, wait_for, worker_proc

from engine import protocol as p
from engine.config import WorkerConfig

pytestmark = pytest.mark.timeout(120)
PROMPTS = [list(range(5 + i, 25 + 2 * i)) for i in range(12)]


def submit(client: RawClient, prefix: str, max_tokens: int = 64) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(len(PROMPTS))]
    for request_id, prompt in zip(ids, PROMPTS, strict=True):
        client.submit(
            request_id, prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True, stream=True
        )
    return ids


def outputs(client: RawClient, ids: list[str]) -> list[list[int]]:
    out = []
    for request_id in ids:
        rec = client.records[request_id]
        assert len(rec.accepted) == 1 and len(rec.finished) == 1 and not rec.errors, request_id
        assert rec.tokens == rec.finished[0]["token_ids"], request_id
        out.append(rec.tokens)
    return out


def running_on(core, worker_id: str) -> bool:
    worker = core.workers.get(worker_id)
    return worker is not None and any(b.step >= 1 for b in list(worker.batches.values()))


def test_stopped_worker_is_detected_and_rejoins_when_continued(tiny_model_dir):
    with engine(tiny_model_dir) as eng, zmq.Context() as ctx:
        core, client = eng.server.core, RawClient(ctx, eng.client_addr)
        try:
            reference = outputs(client, _run(client, "ref"))
            victim = worker_proc(eng, "w1")
            ids = submit(client, "run", max_tokens=160)
            wait_for(lambda: (client.pump(1), running_on(core, "w1"))[1], 30, "w1 to run")
            os.kill(victim.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            wait_for(lambda: "w1" not in core.workers, 10, "w1 declared lost")
            detected_s = time.monotonic() - stopped_at
            client.wait(ids, timeout_s=60)  # served by w2 from the tokens already streamed
            assert [t[:64] for t in outputs(client, ids)] == reference
            os.kill(victim.pid, signal.SIGCONT)
            wait_for(lambda: "w1" in core.workers, 15, "w1 to rejoin by itself")
            assert core.workers["w1"].session == 1 and victim.poll() is None
            again = _run(client, "again")
            assert outputs(client, again) == reference
        finally:
            client.close()
    assert 2.5 <= detected_s < 4.0, detected_s
    print(f"\nFIGURES liveness: stopped (SIGSTOP) worker detected in {detected_s * 1000:.0f} ms")


def _run(client: RawClient, prefix: str) -> list[str]:
    ids = submit(client, prefix)
    client.wait(ids, timeout_s=60)
    return ids


class Stalling:
    """An executor whose step() blocks while ``stall`` is set, or sleeps ``slow_s`` once."""

    def __init__(self, inner, stall: threading.Event, slow: list[float]) -> None:
        self.inner, self.stall, self.slow = inner, stall, slow

    def step(self):
        if self.slow:
            time.sleep(self.slow.pop())  # a long "prefill": no progress meanwhile
        while self.stall.is_set():
            time.sleep(0.01)
        return self.inner.step()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_watchdog_tells_a_hang_from_a_long_prefill(tiny_model_dir):
    from engine.worker.main import build

    cfg = WorkerConfig(
        model=str(tiny_model_dir),
        num_threads=1,
        profile=False,
        worker_id="wx",
        kv_budget_bytes=64 << 20,
    )
    make_executor, ready = build(cfg)
    # Its first batch is predicted at about 1.2 s: the watchdog allows 3 + 4 x 1.2 s for it.
    ready = msgspec.structs.replace(
        ready, time_model=p.TimeModelParams(prefill=[0, 0, 0, 1.0, 0], decode=[0, 0, 0, 0.02])
    )
    stall, slow = threading.Event(), []
    with engine(tiny_model_dir, worker_ids=()) as eng, zmq.Context() as ctx:
        from engine.worker.worker import WorkerLoop

        loop = WorkerLoop(
            dataclasses.replace(cfg, connect=eng.addresses["workers"]),
            lambda: Stalling(make_executor(), stall, slow),
            ready,
            lambda: (None, None, None),
        )
        stop, abort = threading.Event(), threading.Event()
        thread = threading.Thread(target=loop.serve, args=(stop, abort), daemon=True)
        thread.start()
        core, client = eng.server.core, RawClient(ctx, eng.client_addr)
        try:
            eng.wait_for_workers(1, timeout_s=30)
            slow.append(6.0)  # longer than worker_timeout_s, shorter than the allowance
            reference = outputs(client, _run(client, "slow"))
            assert core.workers["wx"].session == 0, "a long prefill was taken for a hang"

            ids = submit(client, "hang", max_tokens=96)
            wait_for(lambda: (client.pump(1), running_on(core, "wx"))[1], 30, "wx to run")
            stall.set()
            stalled_at = time.monotonic()
            wait_for(lambda: "wx" not in core.workers, 15, "the hung worker declared lost")
            detected_s = time.monotonic() - stalled_at
            eng.add_worker(["--worker-id", "w2"])  # someone must serve its requests
            client.wait(ids, timeout_s=60)
            assert [t[:64] for t in outputs(client, ids)] == reference
            stall.clear()  # the compute loop comes back: Reset applies, it rejoins
            wait_for(
                lambda: core.workers.get("wx") and core.workers["wx"].session == 1,
                15,
                "wx to rejoin",
            )
        finally:
            client.close()
            abort.set()
            thread.join(timeout=10)
    # The allowance follows the time model, by then refined online from measured (fast) batches.
    assert 3.0 <= detected_s < 10.0, detected_s
    print(f"\nFIGURES liveness: hung compute loop detected in {detected_s * 1000:.0f} ms")
