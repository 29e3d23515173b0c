"""One SamplingParams from the client to the worker: the client's keyword arguments, Submit's
flat wire fields and the worker's BatchItem are the same struct, and an out-of-range value is
refused with the same words by the client, the broker and a real worker executor."""

from __future__ import annotations

import typing

import msgpack
import pytest

from engine import protocol as p
from engine.broker.validation import Limits, validate_submit
from engine.client import InvalidRequest, SamplingArgs, SamplingParams
from engine.client.types import build_submit
from engine.errors import SubmitError
from engine.worker.executor import Executor

from .helpers import drain, make_run

BAD = [
    {"max_tokens": 0},
    {"temperature": -0.5},
    {"top_p": 1.5},
    {"top_k": -1},
    {"seed": 2**63},
    {"stop": ["", "x"]},
]


def test_the_client_arguments_are_the_struct_fields_and_the_wire_stays_flat():
    assert tuple(typing.get_type_hints(SamplingArgs)) == SamplingParams.__struct_fields__
    msg, frame = build_submit(prompt_ids=[5, 6], temperature=0.7, seed=3, stop="\n", top_k=4)
    plain = msgpack.unpackb(frame)
    assert plain["temperature"] == 0.7 and plain["seed"] == 3 and plain["stop"] == ["\n"]
    assert "sampling" not in plain  # the client's wire is the documented flat map
    assert msg.sampling() == SamplingParams(temperature=0.7, seed=3, stop=["\n"], top_k=4)
    assert type(msg.sampling()) is SamplingParams


def test_the_worker_gets_the_submitted_struct():
    msg, _ = build_submit(prompt_ids=[5], max_tokens=9, temperature=0.3, top_p=0.5, seed=1)
    item = p.BatchItem(
        request_id="r", token_ids=[5], num_generated=0, max_steps=4, max_new_tokens=9,
        sampling=msg.sampling(), keep_kv=False,
    )  # fmt: skip
    decoded = p.decode_to_worker(p.encode(make_run(1, [item])))
    assert decoded.items[0].sampling == msg.sampling()


@pytest.mark.parametrize("bad", BAD, ids=lambda b: next(iter(b)))
def test_client_broker_and_worker_refuse_a_value_with_the_same_words(runner, bad):
    with pytest.raises(InvalidRequest) as client_error:
        build_submit(prompt_ids=[5, 6], **bad)
    words = client_error.value.message
    assert next(iter(bad)) in words

    raw = msgpack.packb({"type": "submit", "request_id": "r", "prompt_ids": [5, 6], **bad})
    limits = Limits(max_context_len=1024, max_gen_len=512, vocab_size=runner.info.vocab_size)
    with pytest.raises(SubmitError) as broker_error:
        validate_submit(p.decode_client_request(raw), [5, 6], limits)
    assert broker_error.value.code == "invalid_request"
    assert broker_error.value.message == words

    executor = Executor(runner, 1 << 24)
    item = p.BatchItem(
        request_id="r", token_ids=[5, 6], num_generated=0, max_steps=4, max_new_tokens=4,
        sampling=SamplingParams(**bad), keep_kv=False,
    )  # fmt: skip
    executor.submit(make_run(1, [item]))
    released = drain(executor).released["r"]
    assert released.reason == "error" and released.message == words
