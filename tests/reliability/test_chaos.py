"""Chaos: a load of 200 streaming requests; one worker is SIGKILLed in the middle of a slice and
restarted; every request must end exactly once, every token arrive exactly once and in order,
and the greedy text equal an undisturbed run's."""

from __future__ import annotations

import random
import time

import pytest
import zmq
from rel_helpers import RawClient, engine, kill, worker_proc

pytestmark = pytest.mark.timeout(240)

NUM_REQUESTS = 200


def make_load(seed: int = 7) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, 512) for _ in range(rng.randrange(4, 60))], rng.randrange(24, 72))
        for _ in range(NUM_REQUESTS)
    ]


def submit_all(client: RawClient, prefix: str, load) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(len(load))]
    for request_id, (prompt, max_tokens) in zip(ids, load, strict=True):
        client.submit(
            request_id, prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True, stream=True
        )
    return ids


def check_exactly_once(client: RawClient, ids: list[str]) -> dict[str, tuple[list[int], str]]:
    """Each request: one Accepted, one Finished, no Error; the Deltas, concatenated, are the
    Finished tokens and text (every token once, in order). Returns the outputs by index."""
    outputs = {}
    for request_id in ids:
        rec = client.records[request_id]
        assert len(rec.accepted) == 1, (request_id, rec.accepted)
        assert rec.errors == [], (request_id, rec.errors)
        assert len(rec.finished) == 1, (request_id, len(rec.finished))
        fin = rec.finished[0]
        assert rec.tokens == fin["token_ids"], request_id
        assert rec.text == fin["text"], request_id
        outputs[request_id.split("-", 1)[1]] = (fin["token_ids"], fin["text"])
    return outputs


class Chaos:
    """Watches the victim from the test thread: kills it mid-slice, times the detection,
    restarts it under the same worker id."""

    def __init__(self, eng, victim_id: str) -> None:
        self.eng, self.core, self.victim_id = eng, eng.server.core, victim_id
        self.killed_at: float | None = None
        self.detected_s: float | None = None
        self.num_held = 0

    def tick(self) -> None:
        if self.killed_at is None:
            worker = self.core.workers.get(self.victim_id)
            batches = list(worker.batches.values()) if worker else []
            running = [b for b in batches if 2 <= b.step < b.dispatch.max_steps - 1]
            num_held = sum(len(b.request_ids) for b in batches)
            if running and num_held >= 10:  # mid-slice, holding a good part of the load
                self.num_held = num_held
                kill(self.eng, worker_proc(self.eng, self.victim_id))
                self.killed_at = time.monotonic()
        elif self.detected_s is None and self.victim_id not in self.core.workers:
            self.detected_s = time.monotonic() - self.killed_at
            self.eng.add_worker(["--worker-id", self.victim_id])  # restart: same identity


def test_sigkill_mid_slice_loses_and_doubles_nothing(tiny_model_dir):
    load = make_load()
    with engine(tiny_model_dir, worker_ids=("w1", "w2")) as eng, zmq.Context() as ctx:
        client = RawClient(ctx, eng.client_addr)
        try:
            ref_ids = submit_all(client, "ref", load)
            client.wait(ref_ids, timeout_s=120)
            reference = check_exactly_once(client, ref_ids)

            core = eng.server.core
            num_finished_before = core.num_finished
            chaos = Chaos(eng, "w1")
            run_ids = submit_all(client, "run", load)
            started = time.monotonic()
            client.wait(run_ids, timeout_s=150, on_tick=chaos.tick)
            elapsed_s = time.monotonic() - started
            assert chaos.killed_at is not None, "the victim never ran a slice"
            assert chaos.detected_s is not None and chaos.detected_s < 3.5
            outputs = check_exactly_once(client, run_ids)
            lost = [i for i in reference if i not in outputs]
            wrong = [i for i in reference if outputs.get(i) != reference[i]]
            assert lost == [] and wrong == []
            assert core.num_finished - num_finished_before == NUM_REQUESTS
            assert client.unrouted == []

            eng.wait_for_workers(2, timeout_s=60)  # the restarted worker rejoined
            after_ids = submit_all(client, "after", load[:20])
            client.wait(after_ids, timeout_s=60)
            after = check_exactly_once(client, after_ids)
            assert all(after[i] == reference[i] for i in after)
        finally:
            client.close()
    print(
        f"\nFIGURES chaos: {NUM_REQUESTS} requests, victim held {chaos.num_held} when killed, "
        f"detected in {chaos.detected_s * 1000:.0f} ms, lost {len(lost)}, duplicated 0, "
        f"wrong text {len(wrong)}, load took {elapsed_s:.1f} s"
    )
