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
    # bench's usage errors are `error:` lines too; its flags name themselves
    (("bench", "--policies", "foo"), b"", USAGE, "unknown policy or peer foo"),
    (("bench", "--workers", "0"), b"", USAGE, "--workers must be at least 1, got 0"),
    (("bench", "--seed", "-1"), b"", USAGE, "--seed must be at least 0, got -1"),
    (("bench", "--num-requests", "0"), b"", USAGE, "--num-requests must be at least 1"),
    (("bench", "--goodput", "ttft:10", "ttft:20"), b"", USAGE, "--goodput gives ttft twice"),
    (("bench", "--out", str(RUN_PY)), b"", USAGE, f"--out {RUN_PY}: a file, not a directory"),
    (("bench", "--out", f"{RUN_PY}/sub"), b"", USAGE, f"--out {RUN_PY}/sub: cannot create it"),
    (("bench", "--journal", str(RUN_PY)), b"", USAGE, f"--journal {RUN_PY}: a file"),
    (("bench", "--workload", "azure:"), b"", USAGE, "nothing after ':'"),
    (("keys", str(RUN_PY)), b"", USAGE, f"{RUN_PY} is a file: give a directory"),
    (("keys", "/proc/nokeys"), b"", USAGE, "cannot write keys in /proc/nokeys"),
    (("keys", "/proc/nokeys", "--client", ""), b"", USAGE, "--client '': a key name is a plain"),
    (("keys", "/proc/nokeys", "--worker", "../evil"), b"", USAGE, "--worker '../evil': a key"),
    (("keys", "/proc/nokeys", "--client", "a", "--client", "a"), b"", USAGE, "a given twice"),
    (("generate", "   "), b"", USAGE, "the prompt is empty"),
    (("profile", "--device", "tpu"), b"", USAGE, "--device 'tpu' is not a device"),
    (("serve", "--device", "tpu"), b"", USAGE, "use cpu, cuda or cuda:N"),
    (("worker", "--device", "cuda:x"), b"", USAGE, "use cpu, cuda or cuda:N"),
    (
        ("serve", "--api-key-file", "/nonexistent", "--http-port", "0", "--port", "0"),
        b"",
        USAGE,
        "--api-key-file: cannot read the API key file '/nonexistent'",
    ),  # fmt: skip
    (("generate", "hi", "--curve-key", str(RUN_PY)), b"", USAGE, "--curve-key needs --broker-key"),
    (("tui", "--curve-key", str(RUN_PY)), b"", USAGE, "--curve-key needs --broker-key"),
    (
        ("worker", "--curve-key", "/nonexistent", "--broker-key", "/x"),
        b"",
        USAGE,
        "cannot read the CURVE key file /nonexistent",
    ),  # fmt: skip
    (
        ("broker", "--curve", "/nonexistent", "--port", "0"),
        b"",
        USAGE,
        "cannot read the CURVE key file /nonexistent/broker.key_secret",
    ),  # fmt: skip
    (("broker", "--bind", "192.0.2.1"), b"", USAGE, "--bind 192.0.2.1 is not an address of this"),
    (("serve", "--bogus"), b"", USAGE, "(`run.py serve --help` lists them)"),
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


def test_a_kv_budget_that_cannot_serve_is_refused_at_start(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    out = run("serve", "--model", model, "--kv-budget", "1KiB", "--port", "0")
    assert_one_line(out, USAGE, "--kv-budget 1KiB cannot hold a single request", alone=True)
    out = run("bench", "--model", model, "--kv-budget", "1B", "--out", str(tmp_path / "b"))
    assert_one_line(out, USAGE, "--kv-budget 1B cannot hold a single request", alone=True)
    out = run("worker", "--model", model, "--kv-budget", "1KiB", "--connect", "127.0.0.1:1")
    assert_one_line(out, USAGE, "give at least 17KiB", alone=False)


def test_debug_shows_the_traceback():
    for level in ("DEBUG", "debug"):  # any case
        out = run("--log-level", level, "worker", "--model", "/nonexistent")
        assert out.returncode == 1 and "Traceback" in out.stderr and "not found" in out.stderr


def test_a_cuda_device_needs_one_visible():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    for command in ("serve", "worker", "profile"):
        out = run(command, "--device", "cuda:0")
        assert_one_line(out, USAGE, "--device cuda:0: no CUDA device is visible", alone=True)


def test_a_file_that_is_not_gguf_is_refused_without_a_lock(tmp_path):
    import os

    cache = tmp_path / "cache"
    for name, data in (("junk.gguf", b"\x00junk bytes" * 10), ("empty.gguf", b"")):
        (tmp_path / name).write_bytes(data)
        out = subprocess.run(
            [sys.executable, str(RUN_PY), "profile", "--model", str(tmp_path / name)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        )  # fmt: skip
        assert_one_line(out, USAGE, "is not a GGUF model file", alone=True)
        assert name in out.stderr
    assert not list(cache.rglob("*.lock"))


def test_sizes_take_terabytes():
    from engine.cli_args import parse_bytes

    assert parse_bytes("10TiB") == 10 * 1024**4 and parse_bytes("2TB") == 2 * 1000**4


def test_a_worker_that_never_reached_a_broker_stops_at_once(tiny_model_dir):
    worker = subprocess.Popen(
        [sys.executable, str(RUN_PY), "worker", "--model", str(tiny_model_dir), "--no-profile",
         "--connect", f"127.0.0.1:{free_port()}", "--drain-timeout", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in worker.stderr:  # the signal handlers are set before this line
            if "connecting to" in line:
                break
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=20)
        assert worker.returncode == 0 and time.monotonic() - started < 10
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate(timeout=10)


def _help(*command: str) -> str:
    out = subprocess.run(
        [sys.executable, str(RUN_PY), *command, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    return " ".join(out.stdout.split())


def test_help_shows_defaults_and_version_prints():
    text = _help("generate")
    for shown in (
        "--max-tokens MAX_TOKENS most tokens to generate (default: 256)",
        "(default: tcp://127.0.0.1:5555)",
        "- reads it from stdin, @FILE from a file",
        "0 is greedy (default: 0.0)",
        "0 disables it (default: 0)",
        "--seed SEED sampling seed, for reproducible sampling (default: none",
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


def test_help_shows_each_default_once_and_only_a_commands_flags():
    texts = {c: _help(*c.split()) for c in ("", "simulate", "bench", "generate", "profile")}
    for command, text in texts.items():
        assert "(default: True)" not in text and "(default: )" not in text, command
        assert not re.search(r"\(default: [^)]*\) \(default:", text), command
    for shown in ("(default: sim-results)", "requests to send (default: 64)",
                  "(default: 0)", "SIGMA^2)), seeded (default: 0.0)",
                  "lengthen shorter outputs to this (tokens) (default: 1)"):  # fmt: skip
        assert shown in texts["simulate"], shown
    assert "workers of each engine (default: 2)" in texts["bench"]
    for flag in ("--peer-bind", "--step-log", "--no-profile", "--host-kv-budget"):
        assert flag not in texts["profile"], flag
