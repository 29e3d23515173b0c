"""End to end over real sockets and real worker processes with the tiny random-weight model."""

from __future__ import annotations

import threading

import msgpack
import pytest
import zmq

from engine.client import Client, RequestRejected

pytestmark = pytest.mark.timeout(180)

PROMPTS = [[5, 6, 7], list(range(10, 60)), [9] * 17, list(range(100, 230)), [42]]


def test_generate_returns_text_tokens_usage_and_timings(scls_engine):
    with Client(scls_engine.client_addr, timeout_s=60) as client:
        result = client.generate(prompt_ids=[5, 6, 7, 8], max_tokens=20, ignore_eos=True)
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 20
    assert result.usage.prompt_tokens == 4 and result.usage.completion_tokens == 20
    assert result.num_slices >= 3  # slice_len 8: 20 tokens need three slices
    t = result.timings
    assert 0 <= t.queued_s <= t.first_token_s <= t.finished_s


def test_text_prompt_and_chat(scls_engine):
    with Client(scls_engine.client_addr, timeout_s=60) as client:
        by_text = client.generate("hello world", max_tokens=5, ignore_eos=True)
        by_chat = client.chat([{"role": "user", "content": "hello"}], max_tokens=5, ignore_eos=True)
    assert by_text.usage.prompt_tokens > 0 and len(by_text.token_ids) == 5
    assert by_chat.usage.prompt_tokens > by_text.usage.prompt_tokens - 10
    assert isinstance(by_chat.text, str)


def test_stream_reassembles_to_the_final_result(scls_engine):
    with Client(scls_engine.client_addr, timeout_s=60) as client:
        stream = client.stream(prompt_ids=list(range(20, 40)), max_tokens=30, ignore_eos=True)
        deltas = list(stream)
        result = stream.result
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert "".join(d.text for d in deltas) == result.text
    assert len(result.token_ids) == 30


def test_cancel_mid_stream(scls_engine):
    with Client(scls_engine.client_addr, timeout_s=60) as client:
        stream = client.stream(
            prompt_ids=[1, 2, 3], max_tokens=200, ignore_eos=True, request_id="to-cancel"
        )
        first = next(iter(stream))
        assert first.token_ids
        client.cancel("to-cancel")
        rest = list(stream)
        assert stream.result.finish_reason == "cancelled"
        assert len(stream.result.token_ids) < 200
        assert len(rest) < 200
        # the engine keeps serving
        assert len(client.generate(prompt_ids=[3, 4], max_tokens=4, ignore_eos=True).token_ids) == 4


def test_batched_greedy_equals_one_at_a_time(scls_engine):
    with Client(scls_engine.client_addr, timeout_s=120) as client:
        alone = [
            client.generate(prompt_ids=p, max_tokens=24, ignore_eos=True).token_ids for p in PROMPTS
        ]
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            results[i] = client.generate(
                prompt_ids=PROMPTS[i], max_tokens=24, ignore_eos=True
            ).token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert [results[i] for i in range(len(PROMPTS))] == alone


def test_many_concurrent_clients(scls_engine):
    results: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with Client(scls_engine.client_addr, timeout_s=120) as client:
                r = client.generate(
                    prompt_ids=[i + 1, i + 2], max_tokens=3 + i % 13, ignore_eos=True
                )
                results.append(len(r.token_ids) - (3 + i % 13))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert not errors
    assert results == [0] * 24


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"prompt_ids": [1] * 5000, "max_tokens": 10}, "prompt_too_long", "accepts"),
        ({"prompt_ids": [1, 2], "max_tokens": 0}, "invalid_request", "max_tokens"),
        ({"prompt_ids": [1, 2], "max_tokens": 100000}, "invalid_request", "max-gen-len"),
        ({"prompt_ids": [1, 2], "temperature": -1.0}, "invalid_request", "temperature"),
        ({"prompt_ids": [1, 2], "top_p": 0.0}, "invalid_request", "top_p"),
        ({"prompt_ids": [10**9]}, "invalid_request", "token ids"),
        ({"prompt": "a", "prompt_ids": [1]}, "invalid_request", "exactly one"),
        ({}, "invalid_request", "exactly one"),
    ],
)
def test_bad_submissions_get_a_clear_error(scls_engine, fields, code, words):
    with Client(scls_engine.client_addr, timeout_s=30) as client:
        with pytest.raises(RequestRejected) as info:
            client.generate(**_as_kwargs(fields))
        assert info.value.code == code
        assert words in info.value.message


def _as_kwargs(fields: dict) -> dict:
    kwargs = dict(fields)
    if "prompt" not in kwargs and "prompt_ids" not in kwargs:
        kwargs["prompt_ids"] = None
    return kwargs


def _raw_exchange(addr: str, frames: list[bytes]) -> list[dict]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    try:
        sock.connect(addr)
        replies = []
        for frame in frames:
            sock.send(frame)
            replies.append(msgpack.unpackb(sock.recv()))
        return replies
    finally:
        sock.close(linger=0)
        ctx.term()


def test_malformed_frames_get_errors_and_the_broker_keeps_serving(scls_engine):
    frames = [
        b"\xc1\xff\x00 not msgpack",
        msgpack.packb({"type": "no_such_type"}),
        msgpack.packb({"type": "submit", "prompt_ids": "not a list"}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"type": "cancel"}),
        msgpack.packb({"type": "cancel", "request_id": "never-submitted"}),
        msgpack.packb({"type": "submit", "request_id": "r1", "max_tokens": "ten", "prompt": "x"}),
    ]
    replies = _raw_exchange(scls_engine.client_addr, frames)
    assert all(r["type"] == "error" for r in replies), replies
    assert [r["code"] for r in replies] == [
        "malformed",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "unknown_request",
        "invalid_request",
    ]
    assert replies[-1]["request_id"] == "r1"
    assert all(r["message"] for r in replies)
    with Client(scls_engine.client_addr, timeout_s=30) as client:
        assert len(client.generate(prompt_ids=[7, 8], max_tokens=3, ignore_eos=True).token_ids) == 3
