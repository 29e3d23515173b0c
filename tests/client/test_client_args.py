"""Local checks of a request's arguments: wrong calls fail before anything is sent, with
InvalidRequest (a ValueError and a RequestRejected with code "invalid_request")."""

from __future__ import annotations

import asyncio

import pytest

from engine import protocol as p
from engine.client import AsyncClient, InvalidRequest, RequestRejected
from engine.client.types import build_submit


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({}, "exactly one of prompt"),
        ({"prompt": "a", "prompt_ids": [1]}, "got prompt, prompt_ids"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
        ({"prompt": b"bytes"}, "prompt must be a str"),
        ({"prompt_ids": []}, "prompt_ids is empty"),
        ({"prompt_ids": [1, -2]}, "prompt_ids[1] is -2"),
        ({"prompt_ids": [1, 2**64]}, "token ids"),
        ({"prompt_ids": [True]}, "token ids"),
        ({"messages": []}, "messages is empty"),
        ({"messages": "hello"}, "list of"),
        ({"messages": [{"role": "user"}]}, 'exactly "role" and'),
        ({"messages": [{"role": "user", "content": 3}]}, "must be str"),
        ({"messages": [{"role": "usr", "content": "a"}]}, "messages[0].role is 'usr': use one"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens must be >= 1"),
        ({"prompt": "a", "max_tokens": 2.0}, "max_tokens must be an int"),
        ({"prompt": "a", "temperature": -1.0}, "temperature"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature"),
        ({"prompt": "a", "temperature": float("inf")}, "temperature must be a finite number"),
        ({"prompt": "a", "max_tokens": -(10**30)}, "max_tokens is -10000"),
        ({"prompt": "a", "top_k": 2**64}, "top_k is 18446744073709551616: out of what"),
        ({"prompt": "a", "top_p": 0.0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "top_k": -1}, "top_k"),
        ({"prompt": "a", "seed": 2**63}, "seed must be in [0, 2**63)"),
        ({"prompt": "a", "stop": [""]}, "stop[0]"),
        ({"prompt": "a", "stop": [1]}, "stop[0]"),
        ({"prompt": "a", "stop": 5}, "stop must be a str or a list of str, got int 5"),
        ({"prompt": "a", "stop": {"x": 1}}, "stop must be a str or a list of str"),
        ({"prompt": "a", "ignore_eos": 1}, "ignore_eos must be a bool"),
        ({"prompt": "a", "request_id": ""}, "request_id"),
        ({"prompt": "a" * (p.MAX_CLIENT_FRAME_BYTES + 1)}, "shorten the prompt"),
    ],
)
def test_wrong_arguments_raise_invalid_request_saying_what_to_pass(kwargs, words):
    with pytest.raises(InvalidRequest) as info:
        build_submit(**kwargs)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, RequestRejected)
    assert error.code == "invalid_request" and words in error.message


def test_good_arguments_build_the_submit_the_broker_decodes():
    msg, frame = build_submit(
        messages=[{"role": "user", "content": "hi"}, p.ChatMessage(role="user", content="!")],
        max_tokens=3, temperature=1, top_p=0.9, top_k=5, seed=0, stop="\n", ignore_eos=True,
        stream=True,
    )  # fmt: skip
    assert p.decode_client_request(frame) == msg
    assert msg.temperature == 1.0 and isinstance(msg.temperature, float)
    assert msg.stop == ["\n"] and len(msg.request_id) == 32
    assert build_submit("x")[0].request_id != msg.request_id


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout_s": 0}, {"timeout_s": -1}, {"timeout_s": float("inf")}, {"connect_timeout_s": None}],
)
def test_wrong_timeouts_are_refused(kwargs):
    with pytest.raises(ValueError, match="seconds"):
        AsyncClient("tcp://127.0.0.1:1", **kwargs)


def test_a_wrong_address_is_refused_and_host_port_accepted():
    for wrong in ("http://localhost:5555", "localhost", "localhost:99999", "a b:1"):
        with pytest.raises(ValueError, match="use HOST:PORT or tcp://HOST:PORT"):
            AsyncClient(wrong)
    client = AsyncClient("localhost:5555")  # the command line's form works here too
    assert client.addr == "tcp://localhost:5555"
    asyncio.run(client.close())


def test_a_sampled_request_without_a_seed_gets_one_from_its_id():
    first, again = (build_submit("x", temperature=0.7, request_id="r1")[0] for _ in range(2))
    assert first.seed is not None and first.seed == again.seed  # the same request, resubmitted
    assert build_submit("x", temperature=0.7, request_id="r2")[0].seed != first.seed
    assert build_submit("x", temperature=0.7, seed=5)[0].seed == 5
    assert build_submit("x")[0].seed is None  # greedy needs none
