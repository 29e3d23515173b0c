"""Child worker processes of ``serve``: started with a death signal, always reaped.

Children run in their own session, so that a terminal's Ctrl-C reaches only the parent, which
drains first and then stops them; the death signal still ends them if the parent dies.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
RUN_PY = Path(__file__).resolve().parent.parent / "run.py"


def _die_with_parent(parent_pid: int) -> None:  # runs in the child between fork and exec (Linux)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return  # not Linux: the parent's stop_all() still reaps children on a normal exit
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody will signal us
        os._exit(1)


def spawn(argv: Sequence[str]) -> subprocess.Popen:
    """Start ``python -m engine.cli ARGV`` as a child that gets SIGTERM if this thread's process
    dies (Linux ties the signal to the spawning thread: spawn from a long-lived thread)."""
    cmd = [sys.executable, "-m", "engine.cli", *argv]
    return subprocess.Popen(
        cmd,
        preexec_fn=functools.partial(_die_with_parent, os.getpid()),  # noqa: PLW1509
        cwd=RUN_PY.parent,
        start_new_session=True,
    )


def stop_all(procs: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM every child, wait, then SIGKILL what is left; never leaves a zombie."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()
