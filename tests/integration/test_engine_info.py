"""What a client can learn from the engine (StatsSnapshot.info, refusals by code), the
dashboard finding the stats address from the client address, and the CLI's prompt sources and
chat session, against a real engine on the tiny model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import zmq

from engine.client import Client
from engine.client.stats import find_stats_address

pytestmark = pytest.mark.timeout(180)
RUN_PY = Path(__file__).resolve().parents[2] / "run.py"


def test_stats_tell_the_model_limits_stats_address_and_refusals(scls_engine, tiny_model_dir):
    refused = [
        b"\xc1",  # not msgpack: malformed
        {"type": "submit", "request_id": "", "prompt_ids": [1]},
        {"type": "submit", "request_id": "a", "prompt_ids": [1], "stop": [""]},
        {"type": "submit", "request_id": "b", "prompt_ids": [1], "max_tokens": 10_000},
    ]
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(scls_engine.client_addr)
        for frame in refused:
            sock.send(frame if isinstance(frame, bytes) else msgpack.packb(frame))
            assert sock.poll(10_000)
            assert msgpack.unpackb(sock.recv())["type"] == "error"
    with Client(scls_engine.client_addr) as client:
        snap = client.stats()
    assert snap.num_rejected_by_code == {"malformed": 1, "invalid_request": 3}
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    info = snap.info
    assert info.model == str(tiny_model_dir) and info.vocab_size == config["vocab_size"]
    assert info.max_context_len == config["max_position_embeddings"]
    assert info.max_gen_len == 256 and info.stats_addr == scls_engine.stats_addr
    assert info.max_client_frame_bytes == 2**20 and info.max_queued_requests == 4096


def test_the_dashboard_finds_the_stats_address_from_the_client_address(scls_engine):
    client_addr, stats_addr = scls_engine.client_addr, scls_engine.stats_addr
    assert asyncio.run(find_stats_address(client_addr)) == stats_addr
    assert asyncio.run(find_stats_address(stats_addr, timeout_s=0.5)) is None


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_PY), *args],
        input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_prompts_from_stdin_and_files_and_a_chat_that_keeps_history(scls_engine, tmp_path):
    addr, few = scls_engine.client_addr, ("--max-tokens", "3", "--ignore-eos")
    piped = cli("generate", "-", "--connect", addr, "--system", "be brief", *few, stdin="hi\n")
    assert piped.returncode == 0 and "3 completion tokens" in piped.stderr, piped.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello from a file\n")
    from_file = cli("generate", f"@{prompt}", "--raw", "--connect", addr, *few)
    assert from_file.returncode == 0 and "[length; " in from_file.stderr, from_file.stderr

    chat = cli("chat", "--connect", addr, *few, stdin="hello\nand again\n/reset\nhello\n")
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr
    with Client(addr) as client:
        recent = [r for r in client.stats().requests if r.state == "finished"][:3]
    third, second, first = (r.prompt_tokens for r in recent)  # most recent first
    assert second > first  # the first turn and its answer went with the second
    assert third == first  # /reset: the conversation starts over
