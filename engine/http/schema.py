"""OpenAI request bodies as msgspec structs, and their translation into the engine's Submit
parameters. Unknown fields are refused (a typo is not silently ignored); OpenAI fields the
engine cannot honour are accepted only at their neutral value."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from engine.http.errors import bad_request

T = TypeVar("T")


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = False


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields shared by /v1/completions and /v1/chat/completions. None means "the default"."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1.0 (the engine's own is 0, greedy)
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extra; -1 or 0 disable it
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = False  # vLLM's extra
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-tracking hint
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessageIn(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int]


def decode_body(body: bytes, kind: type[T]) -> T:
    """Parse a JSON body into ``kind``; a 400 that names the field otherwise."""
    if not body.strip():
        raise bad_request("the request body is empty: send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        hint = ""
        if "unknown field" in str(exc):
            hint = " (this server does not support it: remove it)"
        raise bad_request(f"invalid request body: {exc}{hint}") from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def sampling_params(req: _Sampling) -> dict[str, Any]:
    """Keyword arguments for AsyncClient.generate/stream (max_tokens apart); refuses what the
    engine cannot do (n > 1, penalties, logit_bias) with a 400 that says so."""
    _neutral(req)
    top_k = req.top_k if req.top_k is not None else 0
    if top_k == -1:  # vLLM's spelling of "disabled"
        top_k = 0
    stop = req.stop if req.stop is not None else []
    return {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": top_k,
        "seed": req.seed,
        "stop": [stop] if isinstance(stop, str) else stop,
        "ignore_eos": bool(req.ignore_eos),
    }


def include_usage(req: _Sampling) -> bool:
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "stream_options is only allowed with stream: true", param="stream_options"
        )
    return bool(req.stream_options and req.stream_options.include_usage)


def _neutral(req: _Sampling) -> None:
    if req.n not in (None, 1):
        raise bad_request(f"n must be 1 (got {req.n}): send one request per choice", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0.0):
            raise bad_request(f"{name} is not supported: leave it at 0", param=name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported: leave it out", param="logit_bias")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad_request("echo is not supported: leave it false", param="echo")
        if req.best_of not in (None, 1):
            raise bad_request("best_of must be 1", param="best_of")
        if req.logprobs is not None or req.suffix is not None:
            raise bad_request("logprobs and suffix are not supported: leave them out")
    if isinstance(req, ChatCompletionRequest) and (req.logprobs or req.top_logprobs):
        raise bad_request("logprobs are not supported: leave them out", param="logprobs")


def completion_prompt(req: CompletionRequest) -> dict[str, Any]:
    """``{"prompt": text}`` or ``{"prompt_ids": ids}``: one prompt (a list of one is fine)."""
    prompt: Any = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # ["text"] or [[ids]]: a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty: send some text", param="prompt")
        return {"prompt": prompt}
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"prompt_ids": prompt}
    raise bad_request(
        "prompt must be a string or a list of token ids (one prompt per request; several "
        "prompts in one request are not supported)",
        param="prompt",
    )


def chat_messages(messages: list[ChatMessageIn]) -> list[dict[str, str]]:
    """The engine's {"role", "content"} messages: text parts joined, anything else refused."""
    if not messages:
        raise bad_request("messages is empty: send at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.content is None:
            raise bad_request(
                f"messages[{i}] has no content (tool calls are not supported)", param="messages"
            )
        if isinstance(m.content, str):
            content = m.content
        else:
            content = "".join(_text_part(i, j, part) for j, part in enumerate(m.content))
        out.append({"role": m.role, "content": content})
    return out


def _text_part(i: int, j: int, part: dict[str, Any]) -> str:
    if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise bad_request(
            f"messages[{i}].content[{j}]: only text parts are supported "
            f'({{"type": "text", "text": ...}}), got type {part.get("type")!r}',
            param="messages",
        )
    return part["text"]


def requested_max_tokens(req: _Sampling) -> int | None:
    """max_tokens (or a chat's max_completion_tokens); None when the client gave neither."""
    given = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        if given is not None and given != req.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens differ: send one of them")
        given = req.max_completion_tokens
    return given
