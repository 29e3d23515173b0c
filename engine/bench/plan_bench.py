"""Planning-time benchmark of the policies: one scheduling round for many waiting requests.

Run: ``python -m engine.bench.plan_bench [--waiting 4096] [--workers 8] [--rounds 100]``.
Prints the median and 99th percentile of the wall time and of the CPU time of one
``schedule()`` call per scenario (the policy alone: the broker's view building is not
included), and the CPU time of the broker's other recurring cost, the time-model refit that
every BatchDone triggers. On a shared machine other processes inflate the wall time; compare
CPU medians.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from engine.config import SchedulerConfig
from engine.cost_model import CostModel, MemoryModel, TimeModel
from engine.scheduler.base import Policy, RunningRequest, WaitingRequest, WorkerView
from engine.scheduler.factory import make_policy

KV_BYTES_PER_TOKEN = 46_080  # SmolLM2-135M in float32: 30 layers x 2 x 3 KV heads x 64 x 4 B
KV_BUDGET_BYTES = 2 * 1024**3
NOW = 20.0  # planning time: requests arrived over [0, 20) s, half of them aged (aging_s = 10)

Scenario = tuple[Policy, list[WaitingRequest], list[WorkerView]]


def make_waiting(
    num: int, num_workers: int, parked_per_worker: int, seed: int = 0
) -> list[WaitingRequest]:
    """Prompts of 16..2,048 tokens (log-uniform), 1..1,024 new tokens, arrivals over 20 s; the
    first ``parked_per_worker`` * workers requests continue a slice with KV parked."""
    rng = random.Random(seed)
    out: list[WaitingRequest] = []
    for i in range(num):
        prompt_len = int(2 ** rng.uniform(4, 11))
        generated = rng.randrange(0, 512) if i < parked_per_worker * num_workers else 0
        holder = f"w{i % num_workers}" if i < parked_per_worker * num_workers else None
        out.append(
            WaitingRequest(
                request_id=f"r{i}",
                context_len=prompt_len + generated,
                prompt_len=prompt_len,
                num_generated=generated,
                max_new_tokens=rng.randint(1, 1024 - generated),
                arrived_at=rng.uniform(0.0, 20.0),
                kv_worker_id=holder,
            )
        )
    return out


def make_running(
    worker: int, num: int, slice_len: int, seed: int = 1
) -> tuple[RunningRequest, ...]:
    """``num`` requests in a worker's running set, their slices anywhere between start and end
    (so some are within renewal distance of their boundary)."""
    rng = random.Random(seed + worker)
    return tuple(
        RunningRequest(
            request_id=f"w{worker}-run{i}",
            context_len=int(2 ** rng.uniform(4, 10)),
            max_new_tokens=rng.randint(2, 512),
            reserved_tokens=0,
            slice_steps_left=rng.randint(1, slice_len),
            arrived_at=rng.uniform(0.0, NOW),
        )
        for i in range(num)
    )


def make_workers(
    num: int, now: float, block_tokens: int = 0, running: int = 0, slice_len: int = 64
) -> list[WorkerView]:
    """Idle workers, or ``running`` requests each; ``block_tokens``: a paged KV cache."""
    memory = MemoryModel(KV_BYTES_PER_TOKEN, KV_BUDGET_BYTES, block_tokens=block_tokens)
    return [
        WorkerView(
            worker_id=f"w{i}",
            cost=CostModel(TimeModel.default(), memory),
            busy_until=now - 0.001 * i,
            num_queued_batches=0,
            running=make_running(i, running, slice_len) if running else (),
            parked_kv_bytes=0,
        )
        for i in range(num)
    ]


def time_rounds(
    policy: Policy, waiting: Sequence[WaitingRequest], workers: Sequence[WorkerView], rounds: int
) -> tuple[list[float], list[float], int]:
    """Sorted wall times and CPU times (s) of ``rounds`` calls on the same input, and the
    dispatches per round. CPU time (this process only) is what other processes on a shared
    machine do not inflate, or much less."""
    wall, cpu = [], []
    num_dispatches = 0
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        plan = policy.schedule(waiting, workers, NOW)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
        num_dispatches = len(plan)
    return sorted(wall), sorted(cpu), num_dispatches


def time_refits(num: int = 300, seed: int = 0) -> list[float]:
    """Sorted CPU times (s) of ``TimeModel.observe`` on ``num`` BatchDones' samples (60 decode
    steps and 3 prefills each, 20% noise around a fixed model), as the broker refines a
    worker's model."""
    rng = random.Random(seed)
    truth = TimeModel((2e-4, 1e-3, 1e-5, 5e-3, 1e-8), (2e-6, 2e-3, 1e-6, 2e-2))
    model, cpu = TimeModel.default(), []
    for _ in range(num):
        shapes = [(rng.randint(1, 32), rng.randint(16, 2048)) for _ in range(60)]
        decode = [(n, c, truth.decode_step_s(n, c) * rng.lognormvariate(0, 0.2)) for n, c in shapes]
        shapes = [(rng.randint(1, 8), rng.randint(16, 1024)) for _ in range(3)]
        prefill = [(n, ln, truth.prefill_s(n, ln) * rng.lognormvariate(0, 0.2)) for n, ln in shapes]
        start = time.process_time()
        model.observe(prefill, decode)
        cpu.append(time.process_time() - start)
    return sorted(cpu)


def percentile(sorted_s: list[float], q: float) -> float:
    return sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))]


def scenarios(
    args: argparse.Namespace,
) -> list[tuple[str, Callable[[], Scenario]]]:
    base = SchedulerConfig()
    strict = replace(base, policy="scls:strict", kv_mode="keep")

    def build(
        cfg: SchedulerConfig, parked: int, num_workers: int, block_tokens: int = 0, running: int = 0
    ) -> Callable[[], Scenario]:
        def make() -> Scenario:
            return (
                make_policy(cfg),
                make_waiting(args.waiting, args.workers, parked),
                make_workers(num_workers, NOW, block_tokens, running, cfg.slice_len),
            )

        return make

    w = args.workers
    return [
        ("scls (continuous), all idle, paged", build(base, 0, w, 16)),
        ("scls (continuous), all idle, 64 parked each, paged", build(base, 64, w, 16)),
        ("scls (continuous), 128 running each, paged", build(base, 64, w, 16, 128)),
        ("scls (continuous), 128 running each, padded", build(base, 64, w, 0, 128)),
        ("scls:strict keep, all idle, no parked KV", build(strict, 0, w)),
        ("scls:strict keep, all idle, 64 parked each", build(strict, 64, w)),
        ("scls:strict recompute, all idle", build(replace(strict, kv_mode="recompute"), 0, w)),
        ("scls:strict keep, 1 worker idle", build(strict, 64, 1)),
        ("ils reserve, all idle, paged", build(replace(base, policy="ils"), 0, w, 16)),
        ("sls, all idle", build(replace(base, policy="sls"), 0, w)),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"{args.waiting} waiting requests, {args.workers} workers, {args.rounds} rounds each")
    for label, make in scenarios(args):
        policy, waiting, workers = make()
        policy.schedule(waiting, workers, NOW)  # warm-up
        wall_s, cpu_s, num = time_rounds(policy, waiting, workers, args.rounds)
        figures = "  ".join(
            f"{name} {percentile(times, q) * 1e3:5.2f}"
            for name, times, q in (
                ("wall median", wall_s, 0.5),
                ("p99", wall_s, 0.99),
                ("cpu median", cpu_s, 0.5),
                ("p99", cpu_s, 0.99),
            )
        )
        print(f"  {label:<50} {figures} ms  ({num} batches)")
    refits = time_refits()
    print(
        f"  {'time-model refit per BatchDone (60 + 3 samples)':<50} cpu median "
        f"{percentile(refits, 0.5) * 1e3:5.2f}  p99 {percentile(refits, 0.99) * 1e3:5.2f} ms"
    )


if __name__ == "__main__":
    main()
