"""Journal figures for docs/RELIABILITY.md (a script, not a test; parts B and C need root to
mount a small tmpfs): A, what the journal costs per request and per token on its own; B, its
disk fills up under load; C, its file system turns read-only under load; D, the broker is
SIGKILLed and the end of the journal's log damaged before the restart.

    .venv/bin/python tests/reliability/journal_figures.py [--parts ABCD]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from rel_helpers import RawClient  # noqa: E402
from test_broker_restart import make_load, outputs_of, submit, supervised_engine  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

from engine import protocol as p  # noqa: E402
from engine.broker.journal import Journal  # noqa: E402


def part_a(tmp: Path) -> None:
    """Ticks of 32 live requests, 2 tokens each, one commit per tick; 64 tokens a request."""
    journal = Journal(tmp / "cost.sqlite")
    num_requests, per_tick, tokens_each = 2048, 32, 64
    submit_msg = p.Submit(request_id="x", prompt_ids=list(range(40)), max_tokens=64)
    started = time.perf_counter()
    for first in range(0, num_requests, per_tick):
        ids = [f"r{i}" for i in range(first, first + per_tick)]
        for rid in ids:
            journal.accepted(rid, submit_msg, submit_msg.prompt_ids, b"")
        journal.commit()
        for start in range(0, tokens_each, 2):
            for rid in ids:
                journal.tokens(rid, start, [start, start + 1])
            journal.commit()
        for rid in ids:
            journal.finished(_finished(rid, tokens_each))
        journal.commit()
    elapsed = time.perf_counter() - started
    num_commits = (num_requests // per_tick) * (2 + tokens_each // 2)
    size = sum(f.stat().st_size for f in tmp.glob("cost.sqlite*"))
    journal.close()
    print(
        f"FIGURES journal cost: {num_requests} requests x {tokens_each} tokens in {num_commits} "
        f"commits: {elapsed:.2f} s, {elapsed / (num_requests * tokens_each) * 1e6:.1f} us per "
        f"token, {elapsed / num_commits * 1e6:.0f} us per commit of {per_tick} rows; "
        f"files {size / 2**20:.1f} MiB at the end"
    )


def _finished(rid: str, n: int) -> p.Finished:
    return p.Finished(
        request_id=rid, finish_reason="length", text="x" * n, token_ids=list(range(n)),
        usage=p.Usage(prompt_tokens=40, completion_tokens=n),
        timings=p.Timings(queued_s=0.0, first_token_s=0.1, finished_s=1.0),
    )  # fmt: skip


@contextlib.contextmanager
def small_fs(kind: str):
    """A 4 MiB tmpfs, or an 8 MiB ext4 image on a loop device (its ``abort`` mount option
    turns it read-only at once, open files included, as ext4 does after an I/O error)."""
    path = Path(tempfile.mkdtemp(prefix="journal-fs-"))
    if kind == "tmpfs":
        mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)]
    else:
        image = path.with_suffix(".img")
        subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=1M", "count=8"], check=True, capture_output=True)  # fmt: skip
        subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
        mount = ["mount", "-o", "loop", str(image), str(path)]
    subprocess.run(mount, check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()
        path.with_suffix(".img").unlink(missing_ok=True)


def trouble_under_load(model_dir: Path, what: str) -> None:
    """40 requests accepted; the journal's file system fills (``full``) or turns read-only
    (``ro``); 5 more submitted; once the disk has room again (``full``), one more."""
    load = [dict(fields, max_tokens=200) for fields in make_load()]  # still running when it breaks
    kind = "tmpfs" if what == "full" else "ext4"
    with small_fs(kind) as fs, supervised_engine(model_dir, fs / "journal.sqlite") as eng:
        ctx = zmq.Context()
        client = RawClient(ctx, eng.client_addr)
        accepted = submit(client, "acc", load, range(40))
        while sum(bool(client.records[i].tokens) for i in accepted) < 10:
            client.pump(5)
        filler = fs / "filler"
        if what == "full":
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(bytes(65536))
                    f.flush()
        else:
            subprocess.run(["mount", "-o", "remount,abort", str(fs)], check=True)
        broke_at = time.monotonic()
        refused = submit(client, "new", load, range(40, 45))
        client.wait(accepted + refused, timeout_s=120)
        codes = [(client.records[i].errors or [{"code": "accepted"}])[0]["code"] for i in refused]
        outputs = outputs_of(client, accepted)
        whole = sum(len(outputs[i.split("-")[1]][0]) == load[int(i.split("-")[1])]["max_tokens"] for i in accepted)  # fmt: skip
        after = "(an aborted ext4 stays read-only until remounted: not tried)"
        if what == "full":
            filler.unlink()
            fixed_at, later = time.monotonic(), []
            while not later or client.records[later[-1]].errors:
                later += submit(client, f"later{len(later)}", load, [45])
                client.wait(later[-1:], timeout_s=60)
            after = (
                f"accepted again {time.monotonic() - fixed_at:.2f} s after the disk had room "
                f"({fixed_at - broke_at:.1f} s after it filled)"
            )
        client.close()
        ctx.term()
    print(
        f"FIGURES journal {what}: 40 accepted before, {whole} of them finished whole and once; "
        f"5 submitted after: {codes}; {after}"
    )


def damaged_tail(model_dir: Path, tmp: Path) -> None:
    """SIGKILL the broker under load, zero the last 8 KiB of its log, let it restart."""
    load = make_load()
    with supervised_engine(model_dir, tmp / "damaged.sqlite") as eng:
        eng.broker.max_restarts = 0  # the test restarts it, after the damage
        ctx = zmq.Context()
        first = RawClient(ctx, eng.client_addr)
        ids = submit(first, "run", load, range(100))
        while sum(bool(first.records[i].finished) for i in ids) < 10:
            first.pump(5)
        os.kill(eng.broker.proc.pid, signal.SIGKILL)
        eng.broker.exited.wait(10)
        wal = tmp / "damaged.sqlite-wal"
        data = bytearray(wal.read_bytes())
        data[-8192:] = bytes(8192)
        wal.write_bytes(bytes(data))
        seen = {i: len(first.records[i].tokens) for i in ids if not first.records[i].ended}
        cfg = eng.broker.cfg
        log_path = tmp / "restart.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "--log-level", "INFO", "broker",
                 "--config-json", msgspec.json.encode(cfg).decode()],
                stderr=log, stdout=subprocess.DEVNULL, cwd=Path(__file__).parents[2],
            )  # fmt: skip
        try:
            second = RawClient(ctx, cfg.client_addr)
            resubmitted = submit(second, "run", load, [int(i.split("-")[1]) for i in seen])
            second.wait(resubmitted, timeout_s=150)
            outputs_of(second, resubmitted)
            resumed = [i for i in resubmitted if second.records[i].accepted[0].get("resumed")]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        report = [line.split(": ", 1)[1].strip() for line in log_path.read_text().splitlines()
                  if "journal:" in line]  # fmt: skip
        second.close()
        first.close()
        ctx.term()
    print(
        f"FIGURES journal damaged tail: {len(seen)} in flight at the SIGKILL, {len(resumed)} "
        f"resumed from the journal, {len(seen) - len(resumed)} started anew; every one finished "
        f"once. The restarted broker said: {report}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="ABCD")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model_dir = build_tiny_model(tmp / "model")
        if "A" in args.parts:
            part_a(tmp)
        if "B" in args.parts:
            trouble_under_load(model_dir, "full")
        if "C" in args.parts:
            trouble_under_load(model_dir, "ro")
        if "D" in args.parts:
            damaged_tail(model_dir, tmp)


if __name__ == "__main__":
    main()
