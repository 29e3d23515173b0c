"""What the client hands back (TokenDelta, GenerateResult) and the local check of a request's
arguments, so that an obviously wrong call fails here with ValueError instead of at the broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.client.errors import InvalidRequest
from engine.protocol import (
    MAX_CLIENT_FRAME_BYTES,
    ChatMessage,
    Finished,
    ProtocolError,
    Submit,
    Timings,
    Usage,
    decode_client_request,
    encode,
)

ChatInput = Sequence[ChatMessage | Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New tokens of a streaming request: their text and ids, in order, each exactly once."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """A finished request.

    ``finish_reason``: "stop" (EOS or a stop string), "length" (max_tokens reached),
    "cancelled" (someone cancelled it) or "error" (the engine failed it; the text is partial).
    ``timings`` are seconds from the broker's receipt of the request.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings
    num_slices: int

    @classmethod
    def from_finished(cls, msg: Finished) -> GenerateResult:
        return cls(
            request_id=msg.request_id,
            text=msg.text,
            token_ids=list(msg.token_ids),
            finish_reason=msg.finish_reason,
            usage=msg.usage,
            timings=msg.timings,
            num_slices=msg.num_slices,
        )


def new_request_id() -> str:
    return uuid.uuid4().hex


def build_submit(
    prompt: str | None = None,
    *,
    prompt_ids: Sequence[int] | None = None,
    messages: ChatInput | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Iterable[str] = (),
    ignore_eos: bool = False,
    request_id: str | None = None,
    stream: bool = False,
    deadline_s: float | None = None,
) -> tuple[Submit, bytes]:
    """Check the arguments of a request and encode it; raises InvalidRequest (a ValueError and
    a RequestRejected with code "invalid_request") saying what to pass.

    Returns the message (with a fresh uuid4-hex ``request_id`` when none was given) and its frame.
    """
    sources = {"prompt": prompt, "prompt_ids": prompt_ids, "messages": messages}
    given = [name for name, value in sources.items() if value is not None]
    if len(given) != 1:
        raise InvalidRequest(
            "pass exactly one of prompt= (text), prompt_ids= (token ids) or messages= (chat), "
            f"got {', '.join(given) if given else 'none'}"
        )
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest(
            f"prompt must be a str, got {type(prompt).__name__}: for ids use prompt_ids="
        )
    msg = Submit(
        request_id=_check_request_id(request_id),
        prompt=prompt,
        prompt_ids=_check_prompt_ids(prompt_ids),
        messages=_check_messages(messages),
        max_tokens=_check_int("max_tokens", max_tokens, minimum=1),
        temperature=_check_float("temperature", temperature, minimum=0.0),
        top_p=_check_top_p(top_p),
        top_k=_check_int("top_k", top_k, minimum=0),
        seed=_check_seed(seed),
        stop=_check_stop(stop),
        ignore_eos=_check_bool("ignore_eos", ignore_eos),
        stream=stream,
        deadline_s=deadline_s,
    )
    return msg, _encode_checked(msg)


def _encode_checked(msg: Submit) -> bytes:
    """The frame of ``msg``, refused here if the broker would refuse it as a frame."""
    try:
        frame = encode(msg)
    except (OverflowError, msgspec.EncodeError) as exc:  # ints beyond 64 bits
        raise InvalidRequest(f"cannot encode the request: {exc}") from None
    if len(frame) > MAX_CLIENT_FRAME_BYTES:
        raise InvalidRequest(
            f"the request is {len(frame):,} bytes encoded, the broker accepts frames of at most "
            f"{MAX_CLIENT_FRAME_BYTES:,} bytes: shorten the prompt"
        )
    try:  # the broker's own decoder: a frame that passes here cannot be rejected as malformed
        decode_client_request(frame)
    except ProtocolError as exc:
        raise InvalidRequest(
            f"this request would be rejected by the broker: {exc.message}"
        ) from None
    return frame


def _check_request_id(request_id: str | None) -> str:
    if request_id is None:
        return new_request_id()
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequest(
            f"request_id must be a non-empty str (or None for a fresh one), got {request_id!r}"
        )
    return request_id


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise InvalidRequest(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_seed(seed: Any) -> int | None:
    if seed is not None and _check_int("seed", seed, minimum=0) >= 2**63:
        raise InvalidRequest(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _check_float(name: str, value: Any, *, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not value >= minimum:  # also rejects NaN
        raise InvalidRequest(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def _check_top_p(top_p: Any) -> float:
    value = _check_float("top_p", top_p, minimum=0.0)
    if not 0.0 < value <= 1.0:
        raise InvalidRequest(
            f"top_p must be in (0, 1], got {top_p} (1.0 disables nucleus sampling)"
        )
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_prompt_ids(prompt_ids: Sequence[int] | None) -> list[int] | None:
    if prompt_ids is None:
        return None
    ids = list(prompt_ids)
    if not ids:
        raise InvalidRequest("prompt_ids is empty: the prompt needs at least one token")
    for i, tok in enumerate(ids):
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < 2**63:
            raise InvalidRequest(
                f"prompt_ids must be token ids (ints >= 0): prompt_ids[{i}] is {tok!r}"
            )
    return ids


def _check_messages(messages: ChatInput | None) -> list[ChatMessage] | None:
    if messages is None:
        return None
    if isinstance(messages, str | bytes | Mapping):
        raise InvalidRequest('messages must be a list of {"role": ..., "content": ...} dicts')
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessage):
            role, content = m.role, m.content
        elif isinstance(m, Mapping) and set(m) == {"role", "content"}:
            role, content = m["role"], m["content"]
        else:
            raise InvalidRequest(
                f'messages[{i}] must be a ChatMessage or a dict with exactly "role" and '
                f'"content", got {m!r}'
            )
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}]: role and content must be str, got {m!r}")
        out.append(ChatMessage(role=role, content=content))
    if not out:
        raise InvalidRequest("messages is empty: pass at least one message")
    return out


def _check_stop(stop: str | Iterable[str]) -> list[str]:
    items = [stop] if isinstance(stop, str) else list(stop)
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise InvalidRequest(f"stop[{i}] must be a non-empty str, got {s!r}")
    return items
