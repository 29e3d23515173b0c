"""Every everyday mistake on the command line, run as a user runs it (a subprocess): one line
that says what to change, the documented exit status (README, "Exit status"), no traceback."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
RUN_PY = Path(__file__).resolve().parents[2] / "run.py"
USAGE, FAILED, INTERRUPTED = 2, 1, 130


def run(
    *args: str | bytes, stdin: bytes = b"", timeout_s: float = 60
) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(RUN_PY), *args],
        input=stdin, capture_output=True, timeout=timeout_s,
    )  # fmt: skip
    out.stderr = out.stderr.decode(errors="replace")
    return out


def assert_one_line(out: subprocess.CompletedProcess, status: int, words: str, alone: bool) -> None:
    """One ``error:`` line holding ``words``; ``alone``: nothing else on stderr (runs that load a
    model may print progress bars before it)."""
    assert out.returncode == status, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], out.stderr
    if alone:
        assert [line for line in out.stderr.splitlines() if line.strip()] == errors, out.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# (arguments, stdin, exit status, words of the message); none of them loads a model.
MISTAKES = [
    ((), b"", USAGE, "choose a command: serve, broker"),
    (("frob",), b"", USAGE, "unknown command 'frob'"),
    (("serve", "--workers", "0"), b"", USAGE, "--workers must be at least 1, got 0"),
    (("serve", "--workers", "two"), b"", USAGE, "--workers must be a whole number"),
    (("serve", "--port", "70000"), b"", USAGE, "--port must be in 0..65535, got 70000"),
    (("broker", "--port", "65535"), b"", USAGE, "use at most 65533"),
    (("serve", "--slice-len", "0"), b"", USAGE, "--slice-len must be at least 1"),
    (("serve", "--threads", "0"), b"", USAGE, "--threads must be at least 1"),
    (("serve", "--kv-budget", "0"), b"", USAGE, "--kv-budget must be above 0 bytes"),
    (("serve", "--kv-budget", "lots"), b"", USAGE, "is not a size"),
    (("serve", "--drain-timeout", "-1"), b"", USAGE, "--drain-timeout must be at least 0"),
    (("serve", "--http-port", "99999"), b"", USAGE, "--http-port must be in 0..65535"),
    (("serve", "--model", "/nonexistent"), b"", USAGE, "model '/nonexistent' not found"),
    (("worker", "--model", "/nonexistent"), b"", USAGE, "model '/nonexistent' not found"),
    (("http", "--model", "/nonexistent"), b"", USAGE, "model '/nonexistent' not found"),
    (("broker", "--bind", "tcp://127.0.0.1:5555", "--port", "6000"), b"", USAGE, "give one"),
    (("broker", "--bind", "http://x"), b"", USAGE, "is not an interface to bind"),
    (("worker", "--connect", "broker-host"), b"", USAGE, "use HOST:PORT or tcp://HOST:PORT"),
    (("worker", "--connect", "tcp://h:0"), b"", USAGE, "e.g. tcp://127.0.0.1:5556"),
    (("worker", "--peer-bind", "nowhere"), b"", USAGE, "PORT * for any free port"),
    (
        ("worker", "--step-log", "/proc/nope/x"),
        b"",
        USAGE,
        "--step-log /proc/nope/x: cannot create",
    ),
    (("generate", "hi", "--connect", "ipx://h"), b"", USAGE, "e.g. tcp://127.0.0.1:5555"),
    (("tui", "--connect", "h:70000"), b"", USAGE, "e.g. tcp://127.0.0.1:5557"),
    (("generate",), b"", USAGE, "required: prompt"),
    (("generate", b"caf\xe9"), b"", USAGE, "the prompt is not valid UTF-8 text (byte 0xe9"),
    (("generate", "hi", "--stop", b"\xfe"), b"", USAGE, "--stop is not valid UTF-8"),
    (("generate", "hi", "--system", b"\xff"), b"", USAGE, "--system is not valid UTF-8"),
    (("generate", "hi", "--stop", ""), b"", USAGE, "--stop must not be empty"),
    (("generate", "-"), b"caf\xe9\n", USAGE, "the prompt from stdin is not UTF-8"),
    (("generate", "-"), b"\n", USAGE, "the prompt from stdin is empty"),
    (("generate", "@/nonexistent/p.txt"), b"", USAGE, "cannot read the prompt file"),
    (("generate", "hi", "--system", "s", "--raw"), b"", USAGE, "leave out --raw"),
    (("generate", "hi", "--max-tokens", "0"), b"", USAGE, "--max-tokens must be at least 1"),
    (("generate", "hi", "--temperature", "-1"), b"", USAGE, "--temperature must be at least 0"),
    (("generate", "hi", "--top-p", "1.5"), b"", USAGE, "--top-p must be in (0, 1]"),
    (("generate", "hi", "--seed", str(2**63)), b"", USAGE, "--seed must be below 2**63"),
    (("generate", "hi", "--timeout", "0"), b"", USAGE, "--timeout must be above 0"),
    (("generate", "hi", "--tokens", "3"), b"", USAGE, "unrecognized arguments: --tokens 3"),
    (("demo", "--port", "65535"), b"", USAGE, "--port must be in 1..65533"),
    (("broker", "--journal", "j.sqlite", "--no-journal"), b"", USAGE, "not allowed with argument"),
    (("broker", "--journal", "/dev/null/j.sqlite"), b"", USAGE, "cannot open the journal"),
    (("serve", "--port", "0", "--journal", "/dev/null/j"), b"", USAGE, "pass another --journal"),
]


@pytest.mark.parametrize(("args", "stdin", "status", "words"), MISTAKES, ids=lambda v: repr(v)[:40])
def test_a_mistake_is_one_line_and_a_status(args, stdin, status, words):
    assert_one_line(run(*args, stdin=stdin), status, words, alone=True)


def test_no_broker_and_a_taken_port_say_what_to_do(tiny_model_dir):
    nobody = f"127.0.0.1:{free_port()}"
    out = run("generate", "hi", "--connect", nobody, "--connect-timeout", "0.5")
    assert_one_line(out, FAILED, f"no broker answered at tcp://{nobody}", alone=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        for port_arg in (port, port - 2):  # the client port, then the stats port (PORT+2)
            out = run("broker", "--model", str(tiny_model_dir), "--port", str(port_arg))
            assert_one_line(out, FAILED, f"127.0.0.1:{port}: Address already in use", alone=True)
        assert time.monotonic() - started < 20  # said before the tokenizer loads


def test_a_kv_budget_that_cannot_serve_is_refused_at_start(tiny_model_dir):
    model = str(tiny_model_dir)
    out = run("serve", "--model", model, "--kv-budget", "1KiB", "--port", "0")
    assert_one_line(out, USAGE, "--kv-budget 1KiB cannot hold a single request", alone=True)
    out = run("worker", "--model", model, "--kv-budget", "1KiB", "--connect", "127.0.0.1:1")
    assert_one_line(out, USAGE, "give at least 17KiB", alone=False)


def test_debug_shows_the_traceback():
    out = run("--log-level", "DEBUG", "worker", "--model", "/nonexistent")
    assert out.returncode == 1 and "Traceback" in out.stderr and "not found" in out.stderr


def test_help_shows_defaults_and_version_prints():
    out = subprocess.run(
        [sys.executable, str(RUN_PY), "generate", "--help"], capture_output=True, text=True
    )
    text = " ".join(out.stdout.split())
    assert out.returncode == 0
    for shown in (
        "--max-tokens MAX_TOKENS most tokens to generate (default: 256)",
        "(default: tcp://127.0.0.1:5555)",
        "- reads it from stdin, @FILE from a file",
    ):
        assert shown in text
    out = subprocess.run([sys.executable, str(RUN_PY), "--version"], capture_output=True, text=True)
    assert re.fullmatch(r"scls-engine \S+\n", out.stdout)


def test_interrupt_and_timeout_with_a_broker_but_no_worker(tiny_model_dir):
    broker = subprocess.Popen(
        [sys.executable, str(RUN_PY), "broker", "--model", str(tiny_model_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = broker.stdout.readline()
        client_addr = re.search(r"clients (tcp://\S+),", line).group(1)
        gen = subprocess.Popen(
            [sys.executable, str(RUN_PY), "generate", "hi", "--stream", "--connect", client_addr],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.5)  # accepted, waiting for a worker
        gen.send_signal(signal.SIGINT)
        _, err = gen.communicate(timeout=20)
        assert gen.returncode == INTERRUPTED and "Traceback" not in err
        assert [line for line in err.splitlines() if line.strip()] == ["interrupted"]
        out = run("generate", "hi", "--connect", client_addr, "--timeout", "1")
        assert_one_line(out, FAILED, "the broker has no worker", alone=True)
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.communicate(timeout=30)
    assert broker.returncode == 0
