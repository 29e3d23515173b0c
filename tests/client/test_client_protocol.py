"""The wire contract as a client sees it: every message round-trips, client messages are plain
msgpack maps with named fields, and any bad frame raises ProtocolError with a code."""

from __future__ import annotations

import typing

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_broker import snapshot

from engine import protocol as p

CLIENT_REQUESTS = typing.get_args(p.ClientRequest)
CLIENT_REPLIES = typing.get_args(p.ClientReply)
TO_WORKER = typing.get_args(p.ToWorker)
FROM_WORKER = typing.get_args(p.FromWorker)
CODES = set(p.ERROR_CODES)


def strategy(t: msgspec.inspect.Type) -> st.SearchStrategy:
    """Values of any type used in protocol.py (ints within msgpack's 64 bits, no NaN)."""
    mi = msgspec.inspect
    simple = {
        mi.IntType: st.integers(-(2**63), 2**63 - 1),
        mi.FloatType: st.floats(allow_nan=False),
        mi.StrType: st.text(max_size=8),
        mi.BytesType: st.binary(max_size=8),
        mi.BoolType: st.booleans(),
        mi.NoneType: st.none(),
    }
    if type(t) in simple:
        return simple[type(t)]
    if isinstance(t, mi.UnionType):
        return st.one_of([strategy(x) for x in t.types])
    if isinstance(t, mi.ListType):
        return st.lists(strategy(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(strategy(t.key_type), strategy(t.value_type), max_size=3)
    if isinstance(t, mi.TupleType):
        return st.tuples(*(strategy(x) for x in t.item_types))
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.StructType):
        return st.builds(t.cls, **{f.name: strategy(f.type) for f in t.fields})
    raise TypeError(f"no strategy for {t!r}: extend strategy() for this new field type")


def messages(types: tuple[type, ...]) -> st.SearchStrategy:
    return st.one_of([strategy(msgspec.inspect.type_info(cls)) for cls in types])


def tag_of(cls: type) -> str:
    return cls.__struct_config__.tag


# -- round trips -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(messages(CLIENT_REQUESTS))
def test_client_requests_round_trip_as_maps_with_named_fields(msg):
    frame = p.encode(msg)
    assert p.decode_client_request(frame) == msg
    plain = msgpack.unpackb(frame)
    assert isinstance(plain, dict) and plain["type"] == tag_of(type(msg))
    assert set(plain) - {"type"} <= set(msg.__struct_fields__)


@settings(max_examples=300, deadline=None)
@given(messages(CLIENT_REPLIES))
def test_client_replies_round_trip_as_maps_with_named_fields(msg):
    frame = p.encode(msg)
    assert p.decode_client_reply(frame) == msg
    plain = msgpack.unpackb(frame)
    assert plain["type"] == tag_of(type(msg))
    assert set(plain) - {"type"} == set(msg.__struct_fields__)  # replies carry every field


@settings(max_examples=300, deadline=None)
@given(messages(TO_WORKER))
def test_broker_to_worker_messages_round_trip_as_tagged_arrays(msg):
    frame = p.encode(msg)
    assert p.decode_to_worker(frame) == msg
    plain = msgpack.unpackb(frame)
    assert isinstance(plain, list) and plain[0] == tag_of(type(msg))


@settings(max_examples=300, deadline=None)
@given(messages(FROM_WORKER))
def test_worker_to_broker_messages_round_trip_as_tagged_arrays(msg):
    frame = p.encode(msg)
    assert p.decode_from_worker(frame) == msg
    plain = msgpack.unpackb(frame)
    assert isinstance(plain, list) and plain[0] == tag_of(type(msg))


def test_a_client_in_another_language_can_write_requests_as_plain_maps():
    frame = msgpack.packb(
        {
            "type": "submit",
            "request_id": "r1",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "temperature": 0.7,
            "stop": ["\n"],
            "stream": True,
        }
    )
    msg = p.decode_client_request(frame)
    assert msg == p.Submit(
        request_id="r1",
        messages=[p.ChatMessage(role="user", content="hi")],
        max_tokens=8,
        temperature=0.7,
        stop=["\n"],
        stream=True,
    )
    assert msg.top_p == 1.0 and msg.top_k == 0 and msg.seed is None and not msg.ignore_eos
    cancel = msgpack.packb({"type": "cancel", "request_id": "r1"})
    assert p.decode_client_request(cancel) == p.Cancel(request_id="r1")
    assert p.decode_client_request(msgpack.packb({"type": "get_stats"})) == p.GetStats()


def test_defaults_are_left_out_of_a_submit_and_unknown_fields_are_ignored():
    assert msgpack.unpackb(p.encode(p.Submit(prompt="x"))) == {"type": "submit", "prompt": "x"}
    frame = msgpack.packb({"type": "submit", "prompt": "x", "from_a_newer_client": 1})
    assert p.decode_client_request(frame) == p.Submit(prompt="x")


def test_a_stats_snapshot_reads_as_a_plain_map():
    plain = msgpack.unpackb(p.encode(snapshot(num_waiting=7)))
    assert plain["type"] == "stats" and plain["num_waiting"] == 7 and plain["workers"] == []


# -- malformed frames ------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_protocol_error(frame):
    for decode in (p.decode_client_request, p.decode_client_reply):
        try:
            decode(frame)
        except p.ProtocolError as exc:
            assert exc.code in CODES and exc.message


@settings(max_examples=200, deadline=None)
@given(messages(CLIENT_REQUESTS), st.data())
def test_every_truncated_frame_is_malformed(msg, data):
    frame = p.encode(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(p.ProtocolError) as info:
        p.decode_client_request(frame[:cut])
    assert info.value.code == "malformed"


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        (b"", "malformed", "truncated"),
        (b"\xc1", "malformed", "msgpack"),
        (p.encode(p.Cancel(request_id="r")) + b"\x00", "malformed", "trailing"),
        # Decodable msgpack that is not a request is "invalid_request" (see docs/PROTOCOL.md).
        (msgpack.packb([1, 2, 3]), "invalid_request", "object"),
        (msgpack.packb(5), "invalid_request", "object"),
        (msgpack.packb({"prompt": "x"}), "invalid_request", "type"),
        (msgpack.packb({"type": "no_such_type"}), "invalid_request", "no_such_type"),
        (msgpack.packb({"type": "cancel"}), "invalid_request", "request_id"),
        (msgpack.packb({"type": "submit", "max_tokens": "ten"}), "invalid_request", "max_tokens"),
        (msgpack.packb({"type": "submit", "max_tokens": 1.5}), "invalid_request", "max_tokens"),
        (msgpack.packb({"type": "submit", "prompt_ids": "1 2"}), "invalid_request", "prompt_ids"),
        (msgpack.packb({"type": "submit", "stop": "\n"}), "invalid_request", "stop"),
        (
            msgpack.packb({"type": "submit", "messages": [{"role": "user"}]}),
            "invalid_request",
            "content",
        ),
        (
            msgpack.packb({"type": "submit", "messages": [{"role": "u", "content": "c", "x": 1}]}),
            "invalid_request",
            "x",
        ),
    ],
)
def test_bad_client_frames_raise_protocol_error_with_a_code(frame, code, words):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_client_request(frame)
    assert info.value.code == code
    assert words in info.value.message


def test_a_reply_with_a_bad_finish_reason_or_missing_fields_is_invalid():
    good = msgpack.unpackb(
        p.encode(
            p.Finished(
                request_id="r",
                finish_reason="stop",
                text="",
                token_ids=[],
                usage=p.Usage(prompt_tokens=1, completion_tokens=0),
                timings=p.Timings(queued_s=0.0, first_token_s=None, finished_s=0.1),
            )
        )
    )
    assert p.decode_client_reply(msgpack.packb(good)).num_slices == 0
    for bad in (
        {**good, "finish_reason": "bored"},
        {k: v for k, v in good.items() if k != "usage"},
    ):
        with pytest.raises(p.ProtocolError) as info:
            p.decode_client_reply(msgpack.packb(bad))
        assert info.value.code == "invalid_request"
