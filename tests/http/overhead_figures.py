"""HTTP overhead figures for docs/HTTP.md (a script, not a test): the same requests through the
ZeroMQ client library and through the gateway (`run.py http`, its own process), on a one-worker
engine with the tiny model, so that the engine is fast and the gateway's share shows.

    .venv/bin/python tests/http/overhead_figures.py [--requests 200] [--concurrency 16]

Reports per path: latency of one-token requests sent one at a time, throughput of whole and
streamed requests at a concurrency, and the gateway process's CPU time per request and per
streamed token.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from engine_helpers import local_engine  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

from engine.client import AsyncClient  # noqa: E402

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"
PROMPT = "Once upon a time"


async def zmq_call(client: AsyncClient, max_tokens: int, stream: bool) -> int:
    params = dict(prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if not stream:
        return (await client.generate(**params)).usage.completion_tokens
    async with client.stream(**params) as s:
        async for _ in s:
            pass
    return s.result.usage.completion_tokens


async def http_call(http: httpx.AsyncClient, max_tokens: int, stream: bool) -> int:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if not stream:
        reply = await http.post("/v1/completions", json=body)
        return reply.json()["usage"]["completion_tokens"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line and '"choices":[]' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


async def measure(call, n: int, concurrency: int) -> dict:
    """``n`` calls, ``concurrency`` at a time: wall time, per-call latency, tokens."""
    latencies, tokens = [], 0
    queue = list(range(n))

    async def one_lane() -> None:
        nonlocal tokens
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            got = await call()  # not `tokens += await ...`: that reads tokens before awaiting
            latencies.append(time.perf_counter() - t0)
            tokens += got

    started = time.perf_counter()
    await asyncio.gather(*(one_lane() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "requests_per_s": n / wall,
        "tokens_per_s": tokens / wall,
        "latency_mean_ms": 1000 * statistics.fmean(latencies),
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "tokens": tokens,
    }


def start_gateway(engine, model_dir) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), "--log-level", "WARNING", "http", "--port", "0",
         "--model", str(model_dir), "--connect", engine.client_addr,
         "--stats-connect", engine.stats_addr],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if match := re.match(r"http: OpenAI-compatible API at (\S+)/v1", line):
            return proc, match.group(1)
    raise RuntimeError("the gateway did not start")


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def run(args: argparse.Namespace, engine, url: str, gateway: psutil.Process) -> dict:
    results: dict[str, dict] = {}
    scenarios = [  # name, max_tokens, stream, requests, concurrency
        ("one token, one at a time", 1, False, args.requests // 2, 1),
        ("32 tokens, whole", 32, False, args.requests, args.concurrency),
        ("128 tokens, streamed", 128, True, args.requests // 2, args.concurrency),
    ]
    async with (
        AsyncClient(engine.client_addr, timeout_s=120) as client,
        httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as http,
    ):  # fmt: skip
        for name, max_tokens, stream, n, conc in scenarios:
            via_zmq = functools.partial(zmq_call, client, max_tokens, stream)
            via_http = functools.partial(http_call, http, max_tokens, stream)
            await measure(via_zmq, 4, 1)  # warm up
            await measure(via_http, 4, 1)
            zmq_figures = await measure(via_zmq, n, conc)
            cpu_before = cpu_s(gateway)
            http_figures = await measure(via_http, n, conc)
            gateway_cpu = cpu_s(gateway) - cpu_before
            http_figures["gateway_cpu_ms_per_request"] = 1000 * gateway_cpu / n
            http_figures["gateway_cpu_us_per_token"] = 1e6 * gateway_cpu / http_figures["tokens"]
            results[name] = {"zmq": zmq_figures, "http": http_figures, "n": n, "concurrency": conc}
    return results


def report(results: dict) -> str:
    rows = ["| workload | path | requests/s | tokens/s | latency p50 | gateway CPU |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        for path in ("zmq", "http"):
            f = r[path]
            cpu = (
                f"{f['gateway_cpu_ms_per_request']:.2f} ms/request, "
                f"{f['gateway_cpu_us_per_token']:.0f} us/token"
                if path == "http"
                else ""
            )
            label = "ZeroMQ client" if path == "zmq" else "HTTP gateway"
            rows.append(
                f"| {name} (n={r['n']}, concurrency {r['concurrency']}) | {label} | "
                f"{f['requests_per_s']:.1f} | {f['tokens_per_s']:.0f} | "
                f"{f['latency_p50_ms']:.1f} ms | {cpu} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny")
        with local_engine(model_dir, num_workers=1, slice_len=64, max_gen_len=256) as engine:
            proc, url = start_gateway(engine, model_dir)
            try:
                deadline = time.monotonic() + 30
                while httpx.get(f"{url}/health").status_code != 200:
                    assert time.monotonic() < deadline, "the gateway never became healthy"
                    time.sleep(0.1)
                results = asyncio.run(run(args, engine, url, psutil.Process(proc.pid)))
            finally:
                proc.terminate()
                proc.wait(timeout=20)
                proc.stdout.close()
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
