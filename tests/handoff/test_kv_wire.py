"""The handoff wire format: raw tensor frames with a msgspec header round-trip exactly (float32
and bfloat16); anything malformed is refused, with what was wrong, before a tensor is built."""

from __future__ import annotations

import msgspec
import pytest
import torch

from engine.worker import kv_wire as w

LAYERS, HEADS, DIM = 2, 3, 4


def shape(dtype=torch.float32, max_bytes=1 << 20) -> w.KVShape:
    return w.KVShape(LAYERS, HEADS, DIM, dtype, max_bytes)


def layers(num_tokens: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(num_tokens)
    dims = (1, HEADS, num_tokens, DIM)
    return [
        (torch.randn(dims, generator=gen).to(dtype), torch.randn(dims, generator=gen).to(dtype))
        for _ in range(LAYERS)
    ]


def frames_of(num_tokens: int = 5, dtype=torch.float32) -> tuple[list, list[int]]:
    tokens = list(range(10, 10 + num_tokens))
    return w.encode_kv(7, "r1", tuple(tokens), layers(num_tokens, dtype)), tokens


def receive(frames: list, tokens: list[int], dtype=torch.float32, max_bytes=1 << 20):
    header = w.decode_header(bytes(frames[0]))
    return w.decode_kv(header, [bytes(f) for f in frames[1:]], shape(dtype, max_bytes), tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_kv_cache_round_trips_bit_for_bit(dtype) -> None:
    frames, tokens = frames_of(6, dtype)
    assert len(frames) == 1 + 2 * LAYERS
    got, nbytes = receive(frames, tokens, dtype)
    sent = layers(6, dtype)
    assert nbytes == sum(k.nbytes + v.nbytes for k, v in sent)
    for (k, v), (k2, v2) in zip(got, sent, strict=True):
        assert k.dtype == dtype and torch.equal(k, k2) and torch.equal(v, v2)


def test_requests_round_trip_and_garbage_is_refused() -> None:
    req = w.FetchKV(w.WIRE_VERSION, 3, "r9", 12)
    assert w.decode_request(w.encode_request(req)) == req
    with pytest.raises(w.KVWireError, match="undecodable fetch request"):
        w.decode_request(b"\x93\x01garbage")
    with pytest.raises(w.KVWireError, match="wire version 99"):
        w.decode_request(w.encode_request(w.Probe(99, 1, 10)))
    with pytest.raises(w.KVWireError, match="a fetch is a few bytes"):
        w.decode_request(bytes(w.MAX_REQUEST_FRAME_BYTES + 1))


def _header_edit(frames: list, **fields) -> list:
    header = msgspec.structs.replace(w.decode_header(bytes(frames[0])), **fields)
    return [msgspec.msgpack.encode(header), *frames[1:]]


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda f, t: ([b"\x00\x01"] + f[1:], t), "undecodable handoff header"),
        (lambda f, t: (f[:-1], t), "3 tensor frames, expected 4"),
        (lambda f, t: (f[:-1] + [bytes(f[-1])[:-4]], t), "has 236 bytes, its header says 240"),
        (lambda f, t: (f, t[:-1]), "shape [1, 3, 5, 4], expected [1, 3, 4, 4]"),
        (lambda f, t: (f, t[:-1] + [99]), "covers other tokens"),
        (lambda f, t: (_header_edit(f, dtype="float16"), t), "dtype 'float16'"),
        (lambda f, t: (_header_edit(f, dtype="int64"), t), "dtype 'int64'"),
        (lambda f, t: (_header_edit(f, byte_lengths=[8] * 4), t), "byte lengths [8], expected 240"),
        (lambda f, t: (_header_edit(f, shapes=[[1, 3, 5, 4]] * 3), t), "3 shapes and 4 lengths"),
        (lambda f, t: (_header_edit(f, status="missing", message="gone"), t), "'missing': gone"),
        (lambda f, t: (_header_edit(f, version=2), t), "wire version 2"),
    ],
)
def test_malformed_replies_are_refused_with_what_was_wrong(mangle, message) -> None:
    frames, tokens = frames_of(5)
    frames, tokens = mangle(frames, tokens)
    with pytest.raises(w.KVWireError, match=message.replace("[", r"\[").replace("]", r"\]")):
        receive(frames, tokens)


def test_a_reply_larger_than_the_receiver_accepts_is_refused_before_allocating() -> None:
    frames, tokens = frames_of(5)
    with pytest.raises(w.KVWireError, match="exceed the limit of 100"):
        receive(frames, tokens, max_bytes=100)
