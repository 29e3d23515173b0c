"""OpenAI request bodies as msgspec structs, and their translation into the engine's Submit
parameters. Unknown fields are refused (a typo is not silently ignored); OpenAI fields the
engine cannot honour are accepted only at their neutral value."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from engine.http.errors import bad_request

T = TypeVar("T")


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's extra: only its no-op value, false


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
    # OpenAI fields accepted at their do-nothing value only (_unsupported refuses the rest):
    # null everywhere, and the values named in NO_OP_VALUES.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None


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


#: The do-nothing value (besides null) of the OpenAI fields the engine has no feature for.
NO_OP_VALUES: dict[str, Any] = {
    "tool_choice": "none",
    "response_format": {"type": "text"},
    "store": False,
    "service_tier": "auto",
}
_FIELD_ERROR = re.compile(
    r"Object (contains unknown|missing required) field `([^`]+)`(?: - at `\$\.?([^`]*)`)?"
)


def decode_body(body: bytes, kind: type[T]) -> T:
    """Parse a JSON body into ``kind``; a 400 that names the field otherwise."""
    if not body.strip():
        raise bad_request("the request body is empty: send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        field = _FIELD_ERROR.match(str(exc))
        if field is None:  # "Expected `int`, got `str` - at `$.max_tokens`": errors.py finds it
            raise bad_request(f"invalid request body: {exc}") from None
        what, name, at = field.groups()
        param = f"{at}.{name}" if at else name  # "frobnicate", "messages[0].role"
        hint = " (this server does not support it: remove it)" if what.endswith("unknown") else ""
        raise bad_request(f"invalid request body: {exc}{hint}", param=param) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def sampling_params(req: _Sampling) -> dict[str, Any]:
    """Keyword arguments for AsyncClient.generate/stream (max_tokens apart); refuses what the
    engine cannot do (n > 1, penalties, logit_bias, tools) with a 400 that says so."""
    _neutral(req)
    _unsupported(req)
    _check_int_ranges(req)
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
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        raise bad_request(
            "stream_options.continuous_usage_stats is not supported: leave it false (with "
            "include_usage the last chunk carries the usage)",
            param="stream_options.continuous_usage_stats",
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
        if req.logprobs is not None:
            raise bad_request("logprobs are not supported: leave them out", param="logprobs")
        if req.suffix is not None:
            raise bad_request("suffix is not supported: leave it out", param="suffix")
    if isinstance(req, ChatCompletionRequest) and (req.logprobs or req.top_logprobs):
        param = "logprobs" if req.logprobs else "top_logprobs"
        raise bad_request("logprobs are not supported: leave them out", param=param)


def _unsupported(req: _Sampling) -> None:
    """OpenAI features the engine does not have (tools, structured output, stored
    completions, service tiers): their do-nothing values pass, anything else is a 400."""
    for name in ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                 "response_format", "metadata", "store", "service_tier"):  # fmt: skip
        value = getattr(req, name)
        if value is None or (name in NO_OP_VALUES and value == NO_OP_VALUES[name]):
            continue
        allowed = "null" if name not in NO_OP_VALUES else f"null or {_json(NO_OP_VALUES[name])}"
        raise bad_request(
            f"{name} is {_json(value)[:80]}: this server does not support "
            f"{_FEATURES[name]}; leave {name} out (accepted: {allowed})",
            param=name,
        )


_FEATURES = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "parallel_tool_calls": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "response_format": "structured output (JSON mode, JSON schema)",
    "metadata": "stored completions",
    "store": "stored completions",
    "service_tier": "service tiers",
}

#: The ranges of integer fields, said when a value does not even fit the engine's 64-bit wire.
_INT_RANGES = {
    "max_tokens": "ask for at most the engine's maximal generation length (--max-gen-len)",
    "max_completion_tokens": "ask for at most the engine's maximal generation length "
    "(--max-gen-len)",
    "top_k": "top_k must be >= 0 (0 or -1 disable it)",
    "seed": "seed must be in [0, 2**63)",
}


def _check_int_ranges(req: _Sampling) -> None:
    for name, allowed in _INT_RANGES.items():
        value = getattr(req, name, None)
        if value is not None and not -(2**63) <= value < 2**63:
            raise bad_request(f"{name} is {value}: out of range; {allowed}", param=name)


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


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
                f"messages[{i}] has no content: every message needs one (a string, or a list "
                'of {"type": "text", "text": ...} parts)',
                param=f"messages[{i}].content",
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
