"""Graceful shutdown of `run.py serve` (a real process tree): SIGTERM to a worker drains it
mid-load; SIGTERM to serve stops new work, finishes accepted work, exits 0 and leaves no child
behind; SIGKILL to serve leaves no orphan either."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq
from rel_helpers import RawClient, children_of, wait_for, worker_args

from engine.client import Client
from engine.supervisor import RUN_PY, spawn, stop_all

pytestmark = pytest.mark.timeout(120)


@contextmanager
def serve(
    model_dir, log_path, num_workers: int = 2, extra: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen, str]]:
    cmd = [sys.executable, "-m", "engine.cli", "--log-level", "INFO", "serve", "--port", "0"]
    cmd += [*extra, "--workers", str(num_workers), "--model", str(model_dir), "--threads", "1"]
    cmd += ["--no-profile", "--kv-budget", "64MiB", "--slice-len", "8", "--max-gen-len", "512"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=RUN_PY.parent
        )
    try:
        line = proc.stdout.readline()  # "engine: clients connect to ADDR  (...)"
        assert "clients connect to" in line, line
        addr = line.split("clients connect to ")[1].split()[0]
        with Client(addr, timeout_s=60) as client:
            wait_for(lambda: client.stats().num_workers == num_workers, 60, "workers", step_s=0.1)
        yield proc, addr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode(errors="replace").split("\0")


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_drains_workers_and_broker_and_leaves_no_child(tiny_model_dir, tmp_path):
    with serve(tiny_model_dir, tmp_path / "serve.log") as (proc, addr), zmq.Context() as ctx:
        children = children_of(proc.pid)
        assert len(children) >= 2
        client = RawClient(ctx, addr)
        ids = [f"d-{i}" for i in range(40)]
        for request_id in ids:
            client.submit(
                request_id,
                prompt_ids=list(range(9, 30)),
                max_tokens=500,
                ignore_eos=True,
                stream=True,
            )
        wait_for(
            lambda: (client.pump(5), sum(len(client.records[i].tokens) for i in ids) > 200)[1],
            60,
            "progress",
        )
        workers = sorted(pid for pid in children if "worker" in cmdline(pid))
        assert len(workers) == 2  # beside them: the broker, a child process of its own
        os.kill(workers[0], signal.SIGTERM)  # this worker drains: finishes its slice, leaves
        with Client(addr, timeout_s=10) as observer:
            wait_for(
                lambda: (client.pump(1), observer.stats().num_workers == 1)[1],
                30,
                "the drained worker to leave",
            )
        os.kill(proc.pid, signal.SIGTERM)  # the broker drains: accepted work finishes
        late = []
        while not late or not client.records[late[-1]].ended:  # until one is refused
            late.append(f"late-{len(late)}")
            client.submit(late[-1], prompt_ids=[1, 2], max_tokens=2, ignore_eos=True)
            client.pump(20)
        client.wait([*ids, *late], timeout_s=60)
        assert proc.wait(timeout=30) == 0
        client.close()
    refused = [i for i in late if client.records[i].errors]
    assert [client.records[i].errors[0]["code"] for i in refused] == ["shutting_down"] * len(
        refused
    )
    assert refused, "the draining broker accepted everything"
    for request_id in [*ids, *(i for i in late if i not in refused)]:
        rec = client.records[request_id]
        assert not rec.errors and len(rec.finished) == 1, request_id
    for request_id in ids:  # streamed: every token once, in order
        assert (
            client.records[request_id].tokens == client.records[request_id].finished[0]["token_ids"]
        )
        assert len(client.records[request_id].tokens) == 500
    wait_for(lambda: not any(alive(pid) for pid in children), 15, "no child left", step_s=0.05)


def test_sigkill_of_serve_leaves_no_orphan(tiny_model_dir, tmp_path):
    with serve(tiny_model_dir, tmp_path / "serve.log", num_workers=2) as (proc, _addr):
        children = children_of(proc.pid)
        assert len(children) >= 2
        proc.kill()
        killed_at = time.monotonic()
        wait_for(
            lambda: not any(alive(pid) for pid in children), 15, "the workers to exit", step_s=0.05
        )
    print(
        f"\nFIGURES shutdown: workers of a SIGKILLed serve gone after {time.monotonic() - killed_at:.1f} s"
    )


def submit_long_requests(client: RawClient, ids: list[str]) -> None:
    for request_id in ids:
        client.submit(request_id, prompt_ids=list(range(9, 30)), max_tokens=500, ignore_eos=True)
    wait_for(lambda: (client.pump(5), len(client.records) == len(ids))[1], 30, "accepted")


@pytest.mark.parametrize(("sig", "status", "name"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 1, "SIGTERM")])  # fmt: skip
def test_a_second_signal_that_abandons_requests_fails(tiny_model_dir, tmp_path, sig, status, name):
    log_path = tmp_path / "serve.log"
    with serve(tiny_model_dir, log_path, num_workers=1) as (proc, addr), zmq.Context() as ctx:
        client = RawClient(ctx, addr)
        ids = [f"a-{i}" for i in range(8)]
        submit_long_requests(client, ids)
        os.kill(proc.pid, sig)  # drains...
        wait_for(lambda: "draining" in log_path.read_text(), 20, "the drain", step_s=0.05)
        os.kill(proc.pid, sig)  # ...and this one stops at once
        assert proc.wait(timeout=30) == status
        client.wait(ids, timeout_s=20)
        client.close()
    assert {client.records[i].errors[0]["code"] for i in ids} == {"shutting_down"}
    last = log_path.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: stopped at once on a second {name}"), last


def test_serve_serves_on_with_another_worker_then_drains(tiny_model_dir, tmp_path):
    """Its own worker killed, serve keeps serving with a worker started by hand; when that one
    is gone too it drains (one signal: accepted requests are not cut short) and says why."""
    log_path = tmp_path / "serve.log"
    with (
        serve(tiny_model_dir, log_path, 1, ("--drain-timeout", "3")) as (proc, addr),
        zmq.Context() as ctx,
    ):
        worker_addr = proc.stdout.readline().split("workers connect to ")[1].split(";")[0]
        (own,) = [pid for pid in children_of(proc.pid) if "worker" in cmdline(pid)]
        other = spawn(["worker", "--connect", worker_addr, "--worker-id", "by-hand", *worker_args(tiny_model_dir)])  # fmt: skip
        try:
            with Client(addr, timeout_s=60) as observer:
                wait_for(lambda: observer.stats().num_workers == 2, 60, "the worker by hand")
                os.kill(own, signal.SIGKILL)
                wait_for(lambda: "serving on with them" in log_path.read_text(), 30, "serving on")
                assert proc.poll() is None
                assert observer.generate(
                    prompt_ids=[5, 6, 7], max_tokens=4, ignore_eos=True
                ).token_ids
            client = RawClient(ctx, addr)
            submit_long_requests(client, ["late"])
            other.send_signal(signal.SIGKILL)
            other.wait(timeout=10)
            assert proc.wait(timeout=60) == 1
            client.wait(["late"], timeout_s=10)
            client.close()
        finally:
            stop_all([other])
    text = log_path.read_text()
    assert "second signal" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: every worker of serve exited (killed by SIGKILL),"), last
    assert "after the first joined, and no other worker is joined: drained" in last, last
