"""The real `openai` package against a real gateway and engine (tiny model): completions,
chat, streaming, usage, stop strings, seeds, models and errors."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def sdk(gateway) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0, timeout=30)
    yield client
    client.close()


def count_tokens(gateway, **body) -> int:
    reply = httpx.post(f"{gateway.url}/tokenize", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["count"]


def test_completion_text_usage_and_engine_timings(sdk, gateway):
    prompt = "Paris is the capital of"
    out = sdk.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == "tiny"
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == count_tokens(gateway, prompt=prompt)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    extra = out.model_extra["scls"]
    assert extra["num_slices"] >= 2  # slice_len 8: 12 tokens take two slices
    assert 0 <= extra["queued_s"] <= extra["first_token_s"] <= extra["finished_s"]


def test_chat_completion_counts_the_chat_template(sdk, gateway):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == count_tokens(gateway, messages=messages)


def test_text_parts_are_joined_like_a_plain_string(sdk):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    a = sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
    )
    b = sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello world"}], max_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_the_whole_answer_and_reports_usage_last(sdk, chat):
    params = dict(model="tiny", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    if chat:
        params["messages"] = [{"role": "user", "content": "Count to ten"}]
        whole = sdk.chat.completions.create(**params).choices[0].message.content
        chunks = list(
            sdk.chat.completions.create(
                **params, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        params["prompt"] = "One two three"
        whole = sdk.completions.create(**params).choices[0].text
        chunks = list(
            sdk.completions.create(**params, stream=True, stream_options={"include_usage": True})
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_stop_string_cuts_the_text_before_it(sdk):
    params = dict(model="tiny", prompt="The quick brown fox", temperature=0)
    full = sdk.completions.create(**params, max_tokens=24, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    cut = sdk.completions.create(**params, max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_seed_reproduces_a_sampled_answer(sdk):
    params = dict(
        model="tiny", prompt="Once upon a time", max_tokens=16, temperature=1.0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    first = sdk.completions.create(**params, seed=7).choices[0].text
    assert sdk.completions.create(**params, seed=7).choices[0].text == first
    others = {sdk.completions.create(**params, seed=s).choices[0].text for s in (8, 9, 10)}
    assert others != {first}, "the seed changed nothing: is sampling on?"


def test_models_and_unknown_model(sdk):
    models = sdk.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["max_model_len"] == 2048
    with pytest.raises(openai.NotFoundError) as err:
        sdk.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        ({"max_tokens": 100_000}, "invalid_request", "max_tokens"),
        ({"n": 2}, "invalid_request", "n"),
        ({"temperature": -1.0}, "invalid_request", "temperature"),
        ({"top_p": 0.0}, "invalid_request", "top_p"),
        ({"presence_penalty": 0.5}, "invalid_request", "presence_penalty"),
        ({"prompt": [7] * 3000}, "prompt_too_long", None),
    ],
)
def test_invalid_parameters_are_400_with_the_engine_code(sdk, params, code, param):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4} | params
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(**body)
    assert err.value.status_code == 400
    assert err.value.code == code
    if param is not None:
        assert err.value.param == param
    assert err.value.message  # says what to change
