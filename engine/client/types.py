"""What the client hands back (TokenDelta, GenerateResult) and the local check of a request's
arguments, so that an obviously wrong call fails here with ValueError instead of at the broker."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import msgspec

from engine.client.errors import InvalidRequest
from engine.protocol import (
    MAX_CLIENT_FRAME_BYTES,
    ChatMessage,
    Finished,
    ProtocolError,
    SamplingParams,
    Submit,
    Timings,
    Usage,
    decode_client_request,
    encode,
    messages_problem,
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


class SamplingArgs(TypedDict, total=False):
    """The keyword arguments that make a request's SamplingParams (engine.protocol), for type
    checkers; the defaults and ranges are SamplingParams' own. ``stop`` also takes one str."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: str | Iterable[str]
    ignore_eos: bool


def build_submit(
    prompt: str | None = None,
    *,
    prompt_ids: Sequence[int] | None = None,
    messages: ChatInput | None = None,
    request_id: str | None = None,
    stream: bool = False,
    deadline_s: float | None = None,
    **sampling: Unpack[SamplingArgs],
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
    request_id = _check_request_id(request_id)
    msg = Submit(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=_check_prompt_ids(prompt_ids),
        messages=_check_messages(messages),
        stream=stream,
        deadline_s=deadline_s,
        **msgspec.structs.asdict(_seeded(check_sampling(sampling), request_id)),
    )
    return msg, _encode_checked(msg)


def check_sampling(args: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from keyword arguments: each value's type checked here (a Python caller's
    mistake), then the ranges the broker checks too (SamplingParams.problem)."""
    unknown = sorted(set(args) - set(_TYPE_CHECKS))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument {unknown[0]!r}: the sampling parameters are "
            f"{', '.join(_TYPE_CHECKS)}"
        )
    params = SamplingParams(**{name: _TYPE_CHECKS[name](name, v) for name, v in args.items()})
    problem = params.problem()
    if problem:
        raise InvalidRequest(problem)
    return params


def _seeded(params: SamplingParams, request_id: str) -> SamplingParams:
    """A sampled request without a seed gets one derived from its id: run anew after a
    resubmission (by a broker that lost it: restarted without a journal), it samples the same
    tokens again (docs/PROTOCOL.md, section 8), and the same request sent again stays the same
    request for the broker's idempotency check. Ids are unique (a fresh uuid4 by default), so
    requests still sample differently."""
    if params.greedy or params.seed is not None:
        return params
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return msgspec.structs.replace(params, seed=int.from_bytes(digest, "little") >> 1)


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


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not -(2**63) <= value < 2**64:  # what msgpack carries (the ranges are checked after)
        raise InvalidRequest(f"{name} is {value}: out of what a request carries, [-2**63, 2**64)")
    return value


def _check_seed(name: str, seed: Any) -> int | None:
    return None if seed is None else _check_int(name, seed)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_stop(name: str, stop: str | Iterable[str]) -> list[str]:
    if not isinstance(stop, str | Iterable) or isinstance(stop, bytes | Mapping):
        raise InvalidRequest(
            f"{name} must be a str or a list of str, got {type(stop).__name__} {stop!r}"
        )
    items = [stop] if isinstance(stop, str) else list(stop)
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise InvalidRequest(f"{name}[{i}] must be a non-empty str, got {s!r}")
    return items


_TYPE_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "max_tokens": _check_int,
    "temperature": _check_float,
    "top_p": _check_float,
    "top_k": _check_int,
    "seed": _check_seed,
    "stop": _check_stop,
    "ignore_eos": _check_bool,
}


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
    problem = messages_problem(out)
    if problem:
        raise InvalidRequest(problem)
    return out
