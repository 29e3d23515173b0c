"""`run.py serve --http-port --metrics-port` as a real process tree: the gateway starts with
the engine, a draining engine answers 503 while the streams it accepted finish, and nothing
is left running after."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.timeout(120)
RUN_PY = Path(__file__).resolve().parents[2] / "run.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, "serve exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the gateway never became healthy"
        time.sleep(0.2)


def test_serve_with_http_drains_with_503_and_leaves_nothing(tiny_model_dir, tmp_path):
    metrics_port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), "serve", "--model", str(tiny_model_dir), "--workers", "1",
         "--no-profile", "--kv-budget", "64MiB", "--threads", "1", "--port", "0",
         "--max-gen-len", "2000", "--http-port", "0", "--metrics-port", str(metrics_port),
         "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    children: list[psutil.Process] = []
    try:
        url = None
        for line in proc.stdout:
            if match := re.match(r"http: OpenAI-compatible API at (\S+)/v1", line):
                url = match.group(1)
                break
        assert url is not None, "serve never printed the API's address"
        wait_healthy(url, proc)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert "scls:broker_up 1.0" in metrics
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 4  # the broker, a worker, the gateway, the metrics exporter

        body = {"prompt": "Once upon a time", "max_tokens": 1900, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        with (
            httpx.Client(base_url=url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(proc.pid, signal.SIGTERM)  # drain: accepted requests finish, new ones refused
            deadline = time.monotonic() + 10
            while (reply := http.post("/v1/completions", json={"prompt": "hi"})).status_code != 503:
                assert reply.status_code == 200 and time.monotonic() < deadline, reply.text
                time.sleep(0.05)
            assert reply.json()["error"]["code"] == "shutting_down"
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in children:
            if child.is_running():
                child.kill()
        proc.stdout.close()
        log.close()
