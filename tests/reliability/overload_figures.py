"""Overload figures for docs/RELIABILITY.md (a script, not a test): the sustainable request rate
of a two-worker engine on the tiny model, then Poisson arrivals at twice that rate, without a
queue bound and with one, and the latency of what was accepted.

    .venv/bin/python tests/reliability/overload_figures.py [--seconds 20] [--max-queued 256]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from rel_helpers import engine  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

from engine.broker.admission import QueueLimits  # noqa: E402

PROMPT_LEN, MAX_TOKENS = 32, 64


def run_arrivals(addr: str, run: str, times: list[float], timeout_s: float) -> dict[str, dict]:
    """Submit one request at each offset of ``times`` (seconds); record its outcome. Ids are
    new in each ``run`` (a repeated id and prompt would be answered from the finished cache)."""
    with zmq.Context() as ctx:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(addr)
        rng, out, start = random.Random(0), {}, time.monotonic()
        for i, at in enumerate(times):
            while (now := time.monotonic() - start) < at:
                _pump(sock, out, start, timeout_ms=max(0, int((at - now) * 1000)))
            prompt = [rng.randrange(3, 500) for _ in range(PROMPT_LEN)]
            out[f"{run}-{i}"] = {"sent": time.monotonic() - start}
            sock.send(msgpack.packb({"type": "submit", "request_id": f"{run}-{i}", "prompt_ids": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}))  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while any("end" not in r for r in out.values()) and time.monotonic() < deadline:
            _pump(sock, out, start, timeout_ms=50)
        sock.close(linger=0)
    return out


def _pump(sock, out: dict, start: float, timeout_ms: int) -> None:
    while sock.poll(timeout_ms):
        timeout_ms = 0
        msg = msgpack.unpackb(sock.recv())
        rec = out.get(msg.get("request_id"))
        if rec is not None and msg["type"] in ("finished", "error"):
            rec["end"], rec["kind"] = time.monotonic() - start, msg.get("code", "finished")


def summary(out: dict[str, dict], seconds: float) -> dict:
    done = [r for r in out.values() if r.get("kind") == "finished"]
    lat = sorted(r["end"] - r["sent"] for r in done)
    late = sorted(r["end"] - r["sent"] for r in done if r["sent"] >= seconds * 0.75)

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

    return {
        "submitted": len(out),
        "accepted_and_finished": len(done),
        "accepted_req_per_s": round(len(done) / seconds, 1),
        "overloaded": sum(r.get("kind") == "overloaded" for r in out.values()),
        "unfinished": sum("end" not in r for r in out.values()),
        "latency_p50_s": pct(lat, 0.5),
        "latency_p99_s": pct(lat, 0.99),
        "latency_max_s": pct(lat, 1.0),
        "last_quarter_p99_s": pct(late, 0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-queued", type=int, default=256)
    args = ap.parse_args()
    model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    with engine(model_dir, sched={"max_gen_len": 128}, max_queued_requests=None) as eng:
        core, addr = eng.server.core, eng.client_addr
        run_arrivals(addr, "warm", [0.0] * 50, 60)
        burst = 400
        started = time.monotonic()
        run_arrivals(addr, "burst", [0.0] * burst, 120)
        sustainable = burst / (time.monotonic() - started)
        rate = 2 * sustainable
        rng = random.Random(1)
        times, t = [], 0.0
        while t < args.seconds:
            times.append(t)
            t += rng.expovariate(rate)
        report = {
            "sustainable_req_per_s": round(sustainable, 1),
            "offered_req_per_s": round(rate, 1),
        }
        report["unbounded"] = summary(run_arrivals(addr, "free", times, 300), args.seconds)
        core.queue_limits = QueueLimits(max_requests=args.max_queued)  # between runs: idle
        report[f"max_queued_requests_{args.max_queued}"] = summary(
            run_arrivals(addr, "bounded", times, 120), args.seconds
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
