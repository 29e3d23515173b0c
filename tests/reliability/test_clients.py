"""Clients: a resubmission after a reconnect resumes the same request (idempotent submit); a
client that disappears has its requests cancelled and their memory freed, one that is only slow
loses nothing; per-request deadlines."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq
from rel_helpers import RawClient, engine, wait_for

from engine.client import Client, RequestTimeout
from engine.launcher import LocalEngine

pytestmark = pytest.mark.timeout(120)
PROMPT = list(range(40, 72))


@pytest.fixture(scope="module")
def eng(tiny_model_dir) -> Iterator[LocalEngine]:
    # Slowed 20x (a few ms a step): a 250-token request then takes seconds, longer than the
    # deadlines and grace periods these tests exercise, however fast the engine gets.
    slow = ("--slowdown", "20")
    with engine(
        tiny_model_dir, worker_ids=("w1",), client_grace_s=1.0, extra_worker_args=slow
    ) as e:
        yield e


@pytest.fixture()
def ctx() -> Iterator[zmq.Context]:
    with zmq.Context() as c:
        yield c


def finished_once(client: RawClient, request_id: str) -> dict:
    rec = client.records[request_id]
    assert len(rec.finished) == 1 and not rec.errors, (request_id, rec)
    assert rec.tokens == rec.finished[0]["token_ids"] and rec.text == rec.finished[0]["text"]
    return rec.finished[0]


def test_resubmit_after_reconnect_resumes_the_same_request(eng, ctx):
    core = eng.server.core
    params = dict(prompt_ids=PROMPT, max_tokens=200, ignore_eos=True, stream=True)
    ref = RawClient(ctx, eng.client_addr)
    ref.submit("ref", **params)
    ref.wait(["ref"], 60)
    reference = finished_once(ref, "ref")
    num_finished = core.num_finished

    first = RawClient(ctx, eng.client_addr)
    first.submit("r1", **params)
    wait_for(
        lambda: first.pump(5) is not None and len(first.records["r1"].tokens) >= 12, 30, "tokens"
    )
    first.close()  # the connection closes mid-stream; the request runs on (grace period)
    other = RawClient(ctx, eng.client_addr)
    other.submit("r1", **{**params, "prompt_ids": [1, 2, 3]})  # same id, another request
    other.wait(["r1"], 30)
    assert [e["code"] for e in other.records["r1"].errors] == ["duplicate_request_id"]
    second = RawClient(ctx, eng.client_addr)
    second.submit("r1", **params)  # the same request: resumed, not started again
    second.wait(["r1"], 60)
    assert [a["resumed"] for a in second.records["r1"].accepted] == [True]
    assert finished_once(second, "r1")["token_ids"] == reference["token_ids"]
    assert core.num_finished == num_finished + 1  # generated once

    third = RawClient(ctx, eng.client_addr)  # after it finished: the same answer, not a rerun
    third.submit("r1", **params)
    third.wait(["r1"], 30)
    assert third.records["r1"].accepted[0]["resumed"] is True
    assert finished_once(third, "r1")["token_ids"] == reference["token_ids"]
    assert core.num_finished == num_finished + 1
    for c in (ref, other, second, third):
        c.close()


def test_a_client_that_disappears_has_its_requests_cancelled_and_freed(eng, ctx):
    core = eng.server.core
    gone = RawClient(ctx, eng.client_addr)
    ids = [f"gone-{i}" for i in range(4)]
    for request_id in ids:
        gone.submit(request_id, prompt_ids=PROMPT, max_tokens=250, ignore_eos=True)
    wait_for(
        lambda: (gone.pump(1), all(len(gone.records[i].accepted) for i in ids))[1], 30, "accepts"
    )
    wait_for(
        lambda: any(getattr(core.requests.get(i), "generated", None) for i in ids), 30, "tokens"
    )
    gone.close()
    closed_at = time.monotonic()
    wait_for(lambda: not any(i in core.requests for i in ids), 10, "cancellation")
    cancelled_after_s = time.monotonic() - closed_at
    assert 1.0 <= cancelled_after_s < 3.0  # the grace period, then at once
    worker = core.workers["w1"]
    wait_for(
        lambda: worker.heartbeat.kv_used_bytes == 0 and not core.kv.parked_ids("w1"), 5, "KV freed"
    )
    assert core.num_queued_tokens == 0
    print(
        f"\nFIGURES clients: closed client's requests cancelled after {cancelled_after_s:.2f} s (grace 1 s)"
    )


def test_a_slow_client_loses_nothing(eng, ctx):
    slow = RawClient(ctx, eng.client_addr, rcvhwm=4)
    ids = [f"slow-{i}" for i in range(3)]
    for request_id in ids:
        slow.submit(request_id, prompt_ids=PROMPT, max_tokens=200, ignore_eos=True, stream=True)
    core = eng.server.core
    wait_for(lambda: not any(i in core.requests for i in ids), 60, "the requests to finish unread")
    # The client read nothing for longer than the grace period: it was slow, not gone.
    slow.wait(ids, 30)
    for request_id in ids:
        assert len(finished_once(slow, request_id)["token_ids"]) == 200
    slow.close()


def test_deadline_stops_a_request_and_frees_it(eng, ctx):
    client = RawClient(ctx, eng.client_addr)
    started = time.monotonic()
    client.submit("late", prompt_ids=PROMPT, max_tokens=250, ignore_eos=True, deadline_s=0.4)
    client.wait(["late"], 10)
    rec = client.records["late"]
    assert [e["code"] for e in rec.errors] == ["deadline_exceeded"] and not rec.finished
    assert time.monotonic() - started < 2.0
    assert "late" not in eng.server.core.requests
    client.close()
    with Client(eng.client_addr) as lib, pytest.raises(RequestTimeout):
        lib.generate(prompt_ids=PROMPT, max_tokens=250, ignore_eos=True, timeout_s=0.3)
