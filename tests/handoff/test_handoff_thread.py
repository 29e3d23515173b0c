"""Handoff threads on real loopback sockets: a KV cache moves from one store to another intact;
a missing entry, a malformed reply and a peer that is gone each end in KVFetchFailed, once."""

from __future__ import annotations

import contextlib
import queue
import time

import msgspec
import pytest
import torch
import zmq
from worker.helpers import make_item, make_run

from engine.worker import kv_wire as w
from engine.worker.handoff import HandoffThread
from engine.worker.kv_reuse import KVArrived, KVFetchFailed
from engine.worker.kv_store import KVStore

LAYERS, HEADS, DIM = 2, 3, 4
SHAPE = w.KVShape(LAYERS, HEADS, DIM, torch.float32, max_bytes=1 << 24)


def kv(num_tokens: int):
    gen = torch.Generator().manual_seed(num_tokens)
    dims = (1, HEADS, num_tokens, DIM)
    return [(torch.randn(dims, generator=gen), torch.randn(dims, generator=gen)) for _ in range(2)]


@contextlib.contextmanager
def handoff_thread(ctx, store: KVStore | None = None, base_timeout_s: float = 0.3):
    arrivals: queue.Queue = queue.Queue()
    store = store or KVStore()
    thread = HandoffThread(ctx, lambda: store, SHAPE, arrivals.put, base_timeout_s=base_timeout_s)
    thread.start()
    try:
        yield thread, arrivals
    finally:
        thread.stop()
        thread.join(5)
        assert not thread.is_alive()


def pull(thread: HandoffThread, request_id: str, token_ids: list[int], peer: str) -> None:
    item = msgspec.structs.replace(make_item(request_id, token_ids), kv_source=peer)
    thread.fetch_for(make_run(1, [item]))


def test_a_kv_cache_moves_between_stores_intact(ctx) -> None:
    holder_store = KVStore()
    holder_store.park("r1", list(range(6)), kv(6))
    with handoff_thread(ctx, holder_store) as (holder, _), handoff_thread(ctx) as (receiver, got):
        pull(receiver, "r1", [*range(6), 42], holder.peer_addr)
        msg = got.get(timeout=10)
        assert (
            isinstance(msg, KVArrived) and msg.request_id == "r1" and msg.peer == holder.peer_addr
        )
        assert msg.token_ids == tuple(range(6)) and msg.nbytes == holder.bytes_served > 0
        for (k, v), (k2, v2) in zip(msg.layers, kv(6), strict=True):
            assert torch.equal(k, k2) and torch.equal(v, v2)
        assert "r1" not in holder_store  # moved, not copied
        pull(receiver, "r1", [*range(6), 42], holder.peer_addr)  # nothing left to send
        msg = got.get(timeout=10)
        assert isinstance(msg, KVFetchFailed) and "no KV of r1" in msg.reason


def test_a_peer_that_is_gone_fails_the_fetch_after_its_timeout(ctx) -> None:
    probe_sock = ctx.socket(zmq.ROUTER)
    probe_sock.setsockopt(zmq.LINGER, 0)
    probe_sock.bind("tcp://127.0.0.1:*")
    gone = probe_sock.getsockopt_string(zmq.LAST_ENDPOINT)
    probe_sock.close(linger=0)  # nothing listens there any more
    with handoff_thread(ctx, base_timeout_s=0.3) as (receiver, got):
        started = time.monotonic()
        pull(receiver, "r1", [1, 2, 3], gone)
        msg = got.get(timeout=10)
        assert isinstance(msg, KVFetchFailed) and "no answer from" in msg.reason
        assert 0.25 < time.monotonic() - started < 5
        assert got.empty()


@pytest.mark.parametrize("garbage_header", [False, True])
def test_a_malformed_reply_fails_the_fetch(ctx, garbage_header: bool) -> None:
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.bind("tcp://127.0.0.1:*")
    try:
        with handoff_thread(ctx, base_timeout_s=0.3) as (receiver, got):
            pull(receiver, "r1", [1, 2, 3, 4], fake.getsockopt_string(zmq.LAST_ENDPOINT))
            assert fake.poll(5000)
            identity, frame = fake.recv_multipart()
            request = w.decode_request(frame)
            frames = w.encode_kv(request.fetch_id, "r1", (1, 2, 3), kv(3))
            if garbage_header:  # no fetch id to match: the fetch runs into its timeout
                frames[0] = b"\xc1not msgpack"
            else:  # a valid header, but one tensor frame is short
                frames[-1] = bytes(frames[-1])[:-1]
            fake.send_multipart([identity, *frames])
            msg = got.get(timeout=10)
            assert isinstance(msg, KVFetchFailed)
            expected = "no answer from" if garbage_header else "has 143 bytes, its header says 144"
            assert expected in msg.reason
            with pytest.raises(queue.Empty):  # nothing else, even after the fetch's timeout
                got.get(timeout=0.6)
    finally:
        fake.close(linger=0)


def test_the_probe_measures_a_positive_bandwidth(ctx) -> None:
    store = KVStore()
    thread = HandoffThread(ctx, lambda: store, SHAPE, lambda msg: None)
    try:
        measured = thread.probe(num_bytes=1 << 20, repeats=2)
        assert measured.transfer_bytes_per_s > 1e6 and 0 < measured.transfer_latency_s < 1
    finally:
        thread.start()
        thread.stop()
        thread.join(5)
