"""docs/PROTOCOL.md covers the whole contract, and the examples run against a scripted broker
(the raw one with pyzmq and msgpack only: the proof that the document suffices)."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from scripted_broker import echo

from engine import protocol as p

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()
CLIENT_STRUCTS = [
    *typing.get_args(p.ClientRequest),
    *typing.get_args(p.ClientReply),
    p.ChatMessage, p.Usage, p.Timings, p.WorkerStats, p.BatchInfo, p.RequestInfo, p.LogEvent,
    p.BatchRecord,
]  # fmt: skip
WORKER_MESSAGES = [*typing.get_args(p.ToWorker), *typing.get_args(p.FromWorker), p.BatchItem]


@pytest.mark.parametrize("cls", CLIENT_STRUCTS, ids=lambda c: c.__name__)
def test_every_client_field_is_documented(cls):
    missing = [f for f in cls.__struct_fields__ if f"`{f}`" not in DOC]
    assert not missing, f"docs/PROTOCOL.md does not describe {cls.__name__}.{missing}"
    tag = cls.__struct_config__.tag
    assert tag is None or f'"type": "{tag}"' in DOC or f'`"{tag}"`' in DOC


def test_every_error_code_and_worker_message_is_documented():
    assert [c for c in p.ERROR_CODES if f"| `{c}` |" not in DOC] == []
    undocumented = [
        m.__name__
        for m in WORKER_MESSAGES
        if m.__name__ not in DOC or f"`{m.__struct_config__.tag}`" not in DOC
    ]
    assert undocumented == []
    assert str(p.MAX_CLIENT_FRAME_BYTES // 2**20) + " MiB" in DOC


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def test_the_raw_client_uses_only_pyzmq_and_msgpack():
    tree = ast.parse((ROOT / "examples" / "raw_zmq_client.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    assert imported <= {"__future__", "argparse", "sys", "uuid", "msgpack", "zmq"}


def test_the_raw_client_talks_to_a_broker(make_broker):
    broker = make_broker(echo)
    done = run_example("raw_zmq_client.py", "hello there", "--addr", broker.addr)
    assert done.returncode == 0, done.stderr
    assert "HELLO THERE" in done.stdout and "[stop; 11 prompt + 11 completion" in done.stdout
    assert "[engine: scls, 1 worker(s), 2 waiting, 3 running]" in done.stdout
    submit = broker.expect(p.Submit)
    assert submit.stream and len(submit.request_id) == 32


def test_the_raw_client_reports_a_rejection(make_broker):
    def reject(broker, client_id, msg):
        broker.send(
            client_id,
            p.Error(code="prompt_too_long", message="too long", request_id=msg.request_id),
        )

    done = run_example("raw_zmq_client.py", "x", "--addr", make_broker(reject).addr)
    assert done.returncode == 1 and "rejected (prompt_too_long): too long" in done.stderr


@pytest.mark.parametrize("name", ["submit.py", "stream.py"])
def test_the_library_examples_run(make_broker, name):
    broker = make_broker(echo)
    done = run_example(name, "abc", "--addr", broker.addr, "--max-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert "AB" in done.stdout and "length" in done.stdout


def test_the_library_examples_say_when_no_broker_answers(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "import sys, runpy; sys.argv = ['submit.py', '--addr', "
         f"'ipc://{tmp_path}/nobody']; runpy.run_path('examples/submit.py', run_name='__main__')"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1 and "run.py serve" in done.stderr
