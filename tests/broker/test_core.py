"""The broker core as a pure state machine: a scripted worker, no sockets, no torch."""

from __future__ import annotations

import logging

from engine import protocol as p
from engine.broker.core import BrokerCore, ToClient, ToWorker
from engine.broker.validation import Limits
from engine.config import SchedulerConfig
from engine.scheduler.factory import make_policy

KVB = 1000


def ready(worker_id: str = "w1") -> p.Ready:
    return p.Ready(
        version=p.PROTOCOL_VERSION,
        worker_id=worker_id,
        device="cpu",
        model="m",
        dtype="float32",
        kv_bytes_per_token=KVB,
        kv_budget_bytes=10_000_000,
        max_context_len=2048,
        eos_token_ids=[0],
        mem_total_bytes=None,
        time_model=None,
    )


def make_core(**sched) -> BrokerCore:
    cfg = SchedulerConfig(**{"policy": "scls", "slice_len": 4, "max_gen_len": 64, **sched})
    decode = lambda ids: "".join(chr(97 + t % 26) for t in ids)  # noqa: E731
    return BrokerCore(cfg, make_policy(cfg), decode, Limits(2048, 64, 1000))


def drain(core: BrokerCore) -> tuple[list[ToClient], list[ToWorker]]:
    out, core.outbox = core.outbox, []
    return [o for o in out if isinstance(o, ToClient)], [o for o in out if isinstance(o, ToWorker)]


def run_batch(core: BrokerCore, worker, run: p.RunBatch, now: float, tokens_per_step=1) -> None:
    """Play a worker: every item produces its max_steps tokens (token = step index + 1)."""
    for step in range(run.max_steps):
        toks = [(it.request_id, [step + 1]) for it in run.items if step < it.max_steps]
        if toks:
            core.on_generated(worker, p.Generated(tokens=toks), now)
    for it in run.items:
        reason = "length" if it.max_steps >= it.max_new_tokens else "budget"
        core.on_released(
            worker,
            p.Released(
                batch_id=run.batch_id,
                request_id=it.request_id,
                reason=reason,
                num_generated=it.max_steps,
                kv_kept=reason == "budget" and it.keep_kv,
            ),
            now,
        )
    core.on_batch_done(
        worker,
        p.BatchDone(
            batch_id=run.batch_id,
            steps=run.max_steps,
            prefill_tokens=0,
            pad_tokens=0,
            invalid_tokens=0,
            recomputed_tokens=0,
            reused_kv_tokens=0,
            generated_tokens=0,
            measured_s=0.01,
            measured_peak_bytes=0,
            prefill_samples=[],
            decode_samples=[],
        ),
        now,
    )


def test_request_runs_slice_by_slice_and_finishes_once():
    core = make_core()
    core.add_worker(b"id1", ready(), 0.0)
    worker = core.workers["w1"]
    core.submit(
        b"c1",
        p.Submit(request_id="r", prompt_ids=[1, 2, 3], max_tokens=10, stream=True),
        [1, 2, 3],
        0.0,
    )
    clients, _ = drain(core)
    assert isinstance(clients[0].msg, p.Accepted)
    finished = []
    now = 0.0
    for _ in range(10):
        now += 1.0
        core.schedule(now)
        _, to_workers = drain(core)
        runs = [w.msg for w in to_workers if isinstance(w.msg, p.RunBatch)]
        for run in runs:
            assert run.max_steps <= 4
            run_batch(core, worker, run, now)
        clients, _ = drain(core)
        finished += [c.msg for c in clients if isinstance(c.msg, p.Finished)]
        if finished:
            break
    assert len(finished) == 1
    result = finished[0]
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 10
    assert result.num_slices == 3  # 4 + 4 + 2
    assert not core.requests


def test_every_ended_request_gets_one_log_line(caplog):
    core = make_core()
    core.add_worker(b"id1", ready(), 0.0)
    with caplog.at_level(logging.INFO, logger="engine.requests"):
        core.submit(b"c1", p.Submit(request_id="r", prompt_ids=[1, 2], max_tokens=2), [1, 2], 0.0)
        core.schedule(1.0)
        _, to_workers = drain(core)
        run_batch(core, core.workers["w1"], to_workers[0].msg, 2.0)
        core.submit(b"c1", p.Submit(request_id="gone", prompt_ids=[1], max_tokens=5), [1], 3.0)
        core.cancel(b"c1", "gone", 4.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "engine.requests"]
    assert len(lines) == 2
    assert lines[0].startswith("request r length: 2 prompt + 2 output tokens")
    assert lines[1].startswith("request gone cancelled")


def test_lost_worker_requeues_with_generated_tokens():
    core = make_core()
    core.add_worker(b"id1", ready("w1"), 0.0)
    core.submit(b"c", p.Submit(request_id="r", prompt_ids=[1], max_tokens=10), [1], 0.0)
    core.schedule(1.0)
    _, to_workers = drain(core)
    run = to_workers[0].msg
    core.on_generated(core.workers["w1"], p.Generated(tokens=[("r", [5, 6])]), 1.5)
    core.remove_worker("w1", 2.0, reason="test")
    assert core.requests["r"].generated == [5, 6]
    assert "r" in core.waiting
    assert core.events[-1][2] == "worker w1 lost (test); 1 request requeued"
    core.add_worker(b"id2", ready("w2"), 3.0)
    core.schedule(3.0)
    _, to_workers = drain(core)
    item = to_workers[0].msg.items[0]
    assert item.token_ids == [1, 5, 6] and item.num_generated == 2 and item.max_new_tokens == 8
    assert run.batch_id != to_workers[0].msg.batch_id


def test_stop_string_finishes_and_aborts_on_the_worker():
    core = make_core(slice_len=16)
    core.add_worker(b"id1", ready(), 0.0)
    core.submit(
        b"c", p.Submit(request_id="r", prompt_ids=[1], max_tokens=30, stop=["cd"]), [1], 0.0
    )
    core.schedule(1.0)
    drain(core)
    worker = core.workers["w1"]
    for tok in (0, 1, 2, 3, 4):  # a b c d e
        core.on_generated(worker, p.Generated(tokens=[("r", [tok])]), 1.1)
    clients, to_workers = drain(core)
    finished = [c.msg for c in clients if isinstance(c.msg, p.Finished)]
    assert finished and finished[0].finish_reason == "stop" and finished[0].text == "ab"
    assert any(isinstance(w.msg, p.Abort) for w in to_workers)


def test_cancel_unknown_and_duplicate_ids_are_errors():
    core = make_core()
    core.submit(b"c", p.Submit(request_id="r", prompt_ids=[1], max_tokens=3), [1], 0.0)
    core.submit(b"c", p.Submit(request_id="r", prompt_ids=[1], max_tokens=3), [1], 0.0)
    core.cancel(b"c", "nope", 0.0)
    clients, _ = drain(core)
    codes = [c.msg.code for c in clients if isinstance(c.msg, p.Error)]
    assert codes == ["duplicate_request_id", "unknown_request"]
    core.cancel(b"c", "r", 0.1)
    clients, _ = drain(core)
    assert clients[0].msg.finish_reason == "cancelled"


def test_a_workers_time_model_is_refitted_at_most_once_a_refit_interval():
    """BatchDones come hundreds a second at tens of workers: their samples join the window at
    once, the refit follows at most every REFIT_INTERVAL_S (the first one at once)."""
    import dataclasses

    from engine.broker.core import REFIT_INTERVAL_S
    from engine.cost_model import TimeModel

    core = make_core()
    core.add_worker(b"w1", ready(), 0.0)
    worker = core.workers["w1"]
    fits = []
    time = worker.cost.time

    class Counting(TimeModel):
        def refit(self) -> None:
            fits.append(now)
            super().refit()

    worker.cost = dataclasses.replace(worker.cost, time=Counting(time.prefill, time.decode))
    done = p.BatchDone(
        batch_id=1, steps=1, prefill_tokens=0, pad_tokens=0, invalid_tokens=0,
        recomputed_tokens=0, reused_kv_tokens=0, generated_tokens=0, measured_s=0.01,
        measured_peak_bytes=0, prefill_samples=[], decode_samples=[(4, 100, 0.02)],
    )  # fmt: skip
    for now in (
        1.0,
        1.2,
        1.0 + REFIT_INTERVAL_S - 0.01,
        1.0 + REFIT_INTERVAL_S,
        2.5 + REFIT_INTERVAL_S,
    ):
        core.on_batch_done(worker, done, now)
    assert fits == [1.0, 1.0 + REFIT_INTERVAL_S, 2.5 + REFIT_INTERVAL_S]
