"""The reliability building blocks on their own: admission and retry-after, expiry, the finished
cache, the hang watchdog's verdict, the client outbox (real sockets, tiny queues), peer tracking."""

from __future__ import annotations

import time

import pytest
import zmq

from engine import protocol as p
from engine.broker import admission
from engine.broker.expiry import Expiry
from engine.broker.outbox import ClientOutbox
from engine.broker.peers import MONITOR_EVENTS, PeerTracker
from engine.broker.resume import FinishedCache, FinishedEntry, fingerprint
from engine.broker.workers import BatchState, WorkerState
from engine.cost_model import CostModel
from engine.scheduler.base import Dispatch

pytestmark = pytest.mark.timeout(30)


def test_queue_limits_and_retry_after():
    limits = admission.QueueLimits(max_requests=4, max_tokens=1000)
    assert limits.excess(3, 500, 100) == (0, 0)
    assert limits.excess(4, 500, 100) == (1, 0)
    assert limits.excess(2, 950, 100) == (0, 50)
    assert "max-queued-tokens" in limits.too_big(1001)
    costs = [CostModel.from_ready(None, 1000, 10**9)]
    live = [admission.LiveRequest(remaining, 100, 50) for remaining in (10, 200, 400, 800)]
    with pytest.raises(admission.Overloaded) as info:
        admission.check(limits, live, 400, 100, costs, 256)
    few_left = info.value.retry_after_s
    live_long = [
        admission.LiveRequest(remaining * 10, 100, 50) for remaining in (10, 200, 400, 800)
    ]
    many_left = admission.retry_after_s(costs, live_long, 1, 0, 256)
    assert admission.MIN_RETRY_S <= few_left < many_left <= admission.MAX_RETRY_S
    assert "retry in about" in info.value.message.lower()
    assert admission.retry_after_s([], live, 1, 0, 256) == admission.NO_WORKER_RETRY_S


class _Req:
    def __init__(self, request_id: str, deadline_at: float | None) -> None:
        self.request_id, self.deadline_at = request_id, deadline_at


def test_expiry_deadlines_and_orphans():
    expiry = Expiry(grace_s=1.0)
    live = {r.request_id: r for r in (_Req("a", 5.0), _Req("b", None), _Req("c", 3.0))}
    for req in live.values():
        expiry.watch(req)
    expiry.orphan("b", now=1.0)
    assert list(expiry.due(1.5, live)) == []
    assert [(r.request_id, why) for r, why in expiry.due(3.0, live)] == [
        ("c", "deadline"),
        ("b", "abandoned"),
    ]
    del live["c"]
    expiry.orphan("a", now=3.0)
    expiry.adopt("a")  # resumed by a new connection
    assert [(r.request_id, why) for r, why in expiry.due(10.0, live)] == [("a", "deadline")]


def test_finished_cache_matches_id_fingerprint_and_owner():
    submit = p.Submit(request_id="x", prompt_ids=[1, 2], max_tokens=4)
    fp = fingerprint(submit, [1, 2])
    assert fp == fingerprint(
        p.Submit(request_id="x", prompt_ids=[1, 2], max_tokens=4, stream=True), [1, 2]
    )
    assert fp != fingerprint(p.Submit(request_id="x", prompt_ids=[1, 2], max_tokens=5), [1, 2])
    cache = FinishedCache(max_entries=2)
    finished = p.Finished(
        request_id="x", finish_reason="length", text="", token_ids=[3], num_slices=1,
        usage=p.Usage(prompt_tokens=2, completion_tokens=1),
        timings=p.Timings(queued_s=0, first_token_s=0, finished_s=0),
    )  # fmt: skip
    cache.add(FinishedEntry(fp, b"k", 2, finished))
    assert cache.match("x", fp, b"k") is not None
    assert cache.match("x", fp, b"other key") is None and cache.match("x", b"?", b"k") is None
    for i in range(2):
        cache.add(
            FinishedEntry(fp, b"", 2, p.Finished(**{**_fields(finished), "request_id": f"y{i}"}))
        )
    assert cache.match("x", fp, b"k") is None and len(cache) == 2  # bounded


def _fields(msg) -> dict:
    return {f: getattr(msg, f) for f in msg.__struct_fields__}


def test_watchdog_allows_the_predicted_time_of_the_running_batch():
    ready = p.Ready(
        version=p.PROTOCOL_VERSION, worker_id="w", device="cpu", model="m", dtype="float32",
        kv_bytes_per_token=1, kv_budget_bytes=10**6, max_context_len=64, eos_token_ids=[0],
        mem_total_bytes=None, time_model=None,
    )  # fmt: skip
    worker = WorkerState("w", b"id", ready, CostModel.from_ready(None, 1, 10**6), 0.0, 0.0)
    assert worker.lost_reason(2.0, timeout_s=3.0, hang_factor=4.0) is None
    assert "silent" in worker.lost_reason(3.5, 3.0, 4.0)
    worker.last_seen_at = 100.0
    dispatch = Dispatch("w", ("r",), 8, False, 10, predicted_s=10.0, predicted_peak_bytes=0)
    worker.add_batch(BatchState(1, "w", dispatch, {"r"}, 90.0, 1), now=90.0)  # a long prefill
    assert worker.lost_reason(100.0, 3.0, 4.0) is None  # 10 s without progress: allowed 43 s
    worker.last_seen_at = 134.0
    assert "hung" in worker.lost_reason(134.0, 3.0, 4.0)


def test_outbox_holds_merges_and_never_loses_a_live_requests_replies():
    with zmq.Context() as ctx:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        for sock in (router, dealer):
            sock.linger = 0
        router.sndhwm, dealer.rcvhwm = 2, 2
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        client_id, _ = router.recv_multipart()
        outbox = ClientOutbox(router, max_droppable=3)
        outbox.send(client_id, p.Accepted(request_id="r", prompt_tokens=1))
        for token in range(2000):  # the client reads nothing meanwhile
            outbox.send(client_id, p.Delta(request_id="r", text=str(token % 10), token_ids=[token]))
            outbox.send(client_id, p.Error(code="malformed", message="x"), droppable=True)
        outbox.send(client_id, p.Error(code="deadline_exceeded", message="late", request_id="r"))
        held = outbox.num_waiting
        assert 0 < held < 2000  # Deltas waiting merged into few messages
        replies, deadline = [], time.monotonic() + 10
        while not replies or not isinstance(replies[-1], p.Error) or replies[-1].request_id != "r":
            assert time.monotonic() < deadline
            outbox.flush()
            while dealer.poll(10):
                replies.append(p.decode_client_reply(dealer.recv()))
        deltas = [m for m in replies if isinstance(m, p.Delta)]
        assert [t for d in deltas for t in d.token_ids] == list(range(2000))
        assert "".join(d.text for d in deltas) == "".join(str(t % 10) for t in range(2000))
        assert outbox.num_dropped > 0 and outbox.num_waiting == 0
        dealer.close(linger=0)
        while True:  # until the router has seen the peer go
            try:
                router.send_multipart([client_id, b"\xc0"], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    break
            assert time.monotonic() < deadline + 10
        outbox.send(client_id, p.Delta(request_id="r", text="", token_ids=[1]))  # dropped, no raise


def test_peer_tracker_names_the_connection_that_closed():
    with zmq.Context() as ctx:
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        monitor = router.get_monitor_socket(MONITOR_EVENTS)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        tracker = PeerTracker("clients")
        for _ in range(3):  # each new connection reuses the closed one's descriptor
            dealer = ctx.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(b"x")
            routing_id, payload = router.recv_multipart(copy=False)
            assert tracker.needs_bind(routing_id.bytes)
            tracker.bind(routing_id.bytes, payload.get(zmq.SRCFD))
            dealer.close(linger=0)
            gone = None
            while gone is None and monitor.poll(2000):
                gone = tracker.on_event(monitor.recv_multipart())
            assert gone == routing_id.bytes
        monitor.close(linger=0)
        router.close(linger=0)


def test_the_broker_core_and_its_rules_import_neither_zmq_nor_torch():
    from layering import ENGINE, imported_modules

    names = ["core", "intake", "admission", "expiry", "resume", "requests", "workers", "validation"]
    names += [
        "kv_ledger",
        "request_log",
        "journal",
        "journal_wal",
        "recovery",
        "prefix_index",
        "views",
        "plan_check",
    ]
    for path in (ENGINE / "broker" / f"{name}.py" for name in names):
        for module in imported_modules(path):
            assert module.split(".")[0] not in {"zmq", "torch"}, f"{path.name} imports {module}"
