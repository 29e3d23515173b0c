"""Bearer-token authentication, and `run.py http` on the command line: a user's mistake is
one line and an exit status, a bind beyond loopback without a key is warned about, SIGTERM
stops it cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from gateway_helpers import gateway_for

pytestmark = pytest.mark.timeout(90)
RUN_PY = Path(__file__).resolve().parents[2] / "run.py"


def test_api_key_guards_the_api_but_not_probes(engine, tiny_model_dir):
    with (
        gateway_for(engine, tiny_model_dir, api_keys=("k-one", "k-two")) as gw,
        httpx.Client(base_url=gw.url, timeout=10) as http,
    ):
        gw.wait_ready()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic k-one"}):
            reply = http.get("/v1/models", headers=headers)
            assert reply.status_code == 401, headers
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert reply.headers["www-authenticate"] == "Bearer"
        assert http.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer k-two"}).status_code == 200
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        good = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k-one", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        bad = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
        good.close()
        bad.close()


def test_standalone_gateway_asks_the_broker_for_its_stats(engine, tiny_model_dir):
    """`run.py http --connect` alone, in front of a broker whose stats port is not the client
    port + 2: it asks the broker where its stats are, as `run.py tui` does."""
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), "http", "--port", "0", "--model", str(tiny_model_dir),
         "--connect", engine.client_addr],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = next(m.group(1) for line in proc.stdout if (m := re.search(r"API at (\S+)/v1", line)))
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health", timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, health.text
            time.sleep(0.1)
        assert health.json()["num_workers"] == 1
        _stop(proc)
    finally:
        _reap(proc)


def run_http(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_PY), "http", *args],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


def assert_one_line_error(out: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], out.stderr


def test_command_line_mistakes_are_one_line(tmp_path, tiny_model_dir):
    missing = str(tmp_path / "no-such-file")
    assert_one_line_error(run_http("--api-key-file", missing), 2, "cannot read the API key file")
    empty = tmp_path / "empty.keys"
    empty.write_text("# nothing here\n\n")
    assert_one_line_error(run_http("--api-key-file", str(empty)), 2, "holds no key")
    assert_one_line_error(run_http("--port", "70000"), 2, "--port must be in 0..65535")
    no_model = run_http("--model", str(tmp_path / "nothing"), "--port", "0")
    assert_one_line_error(no_model, 2, "not found")  # a usage error, as for every command
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        busy = run_http("--model", str(tiny_model_dir), "--port", port)
    assert_one_line_error(busy, 1, f"cannot listen on 127.0.0.1:{port}")


def test_beyond_loopback_without_key_warns_and_sigterm_stops(tiny_model_dir):
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), "http", "--bind", "0.0.0.0", "--port", "0",
         "--model", str(tiny_model_dir), "--connect", "tcp://127.0.0.1:9"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:  # the warning comes before the "http: ... at URL" line
            lines.append(line)
            if line.startswith("http: "):
                break
        assert any("without authentication" in line for line in lines), lines
        _stop(proc)
    finally:
        _reap(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM: a gateway drains and exits 0."""
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdout.close()
