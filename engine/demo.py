"""`run.py demo`: the engine on the embedded model with two workers, a scripted load, and the
results live (the dashboard on a terminal, plain lines otherwise)."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time

from engine import cli_args
from engine.launcher import LocalEngine

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a KV cache is.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What does a CPU do?",
    "Translate 'good morning' into Spanish and German.",
    "Name the planets of the solar system.",
    "Write one sentence about slice-level scheduling.",
    "What is 12 times 13?",
    "Tell me a fun fact about octopuses.",
]


async def _one(client, i: int, rng: random.Random, report) -> None:
    await asyncio.sleep(rng.expovariate(4.0) * i / 4)  # staggered arrivals, about 4 per second
    question = QUESTIONS[i % len(QUESTIONS)]
    max_tokens = rng.choice([24, 48, 96, 160])
    start = time.monotonic()
    try:
        result = await client.chat([{"role": "user", "content": question}], max_tokens=max_tokens)
    except Exception as exc:  # shown to the user, the demo goes on with the other requests
        report(f"request {i:2d} failed: {exc}")
        return
    answer = " ".join(result.text.split())
    report(
        f"req {i:2d} | {result.usage.completion_tokens:3d} tokens | {result.num_slices} slice(s) | "
        f"first token {result.timings.first_token_s or 0:.2f} s | {time.monotonic() - start:5.2f} s | "
        f"{question[:34]:34s} -> {answer[:60]}"
    )


async def send_load(client_addr: str, num_requests: int, report) -> None:
    from engine.client import AsyncClient

    rng = random.Random(0)
    async with AsyncClient(client_addr, timeout_s=600) as client:
        await asyncio.gather(*(_one(client, i, rng, report) for i in range(num_requests)))


def run_demo(args: argparse.Namespace) -> int:
    from engine.config import BrokerConfig

    sched = cli_args.scheduler_config(args)
    cfg = BrokerConfig(
        client_addr=f"tcp://127.0.0.1:{args.port}",
        worker_addr=f"tcp://127.0.0.1:{args.port + 1}",
        stats_addr=f"tcp://127.0.0.1:{args.port + 2}",
        model=args.model,
        scheduler=sched,
    )
    worker = cli_args.worker_config(args, connect="", device="cpu", threads=args.threads or 1)
    worker_args = cli_args.worker_flags(worker)
    print(
        f"demo: starting a broker and {args.workers} workers on model {args.model!r} "
        "(the first start converts the embedded model, about 20 s) ...",
        flush=True,
    )
    with LocalEngine(cfg, num_workers=args.workers, worker_args=worker_args) as engine:
        print(f"demo: engine up; clients connect to {engine.client_addr}", flush=True)
        if sys.stdout.isatty() and not args.plain:
            return _with_dashboard(engine, args.num_requests)
        started = time.monotonic()
        asyncio.run(
            send_load(engine.client_addr, args.num_requests, lambda line: print(line, flush=True))
        )
        print(
            f"demo: {args.num_requests} requests in {time.monotonic() - started:.1f} s", flush=True
        )
    return 0


def _with_dashboard(engine: LocalEngine, num_requests: int) -> int:
    from tui.app import run_dashboard

    lines: list[str] = []
    load = threading.Thread(
        target=lambda: asyncio.run(send_load(engine.client_addr, num_requests, lines.append)),
        daemon=True,
    )
    load.start()
    run_dashboard(engine.stats_addr)
    print("\n".join(lines))
    return 0
