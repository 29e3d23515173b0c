"""Admission checks on a submitted request: each failure names the field and what to change."""

from __future__ import annotations

from dataclasses import dataclass, replace

import msgspec

from engine import protocol as p
from engine.errors import SubmitError


@dataclass(frozen=True, slots=True)
class Limits:
    max_context_len: int  # prompt + generated tokens the model accepts
    max_gen_len: int  # L: the most tokens one request may ask for
    vocab_size: int

    def with_worker(self, ready: p.Ready) -> Limits:
        return replace(self, max_context_len=min(self.max_context_len, ready.max_context_len))


def check_prompt_fields(msg: p.Submit, max_prompt_chars: int | None = None) -> None:
    """A non-empty request_id if any, exactly one prompt form, and (given ``max_prompt_chars``) no text so long that no model
    context could hold it: checked before tokenization, which would cost the broker's time."""
    if msg.request_id == "":
        raise SubmitError(
            "invalid_request",
            "request_id is empty: give a non-empty id (a uuid4 hex), or leave it out to get one",
        )
    given = [
        name for name in ("prompt", "prompt_ids", "messages") if getattr(msg, name) is not None
    ]
    if len(given) != 1:
        raise SubmitError(
            "invalid_request",
            f"give exactly one of prompt, prompt_ids or messages (got {', '.join(given) or 'none'})",
        )
    if msg.messages is not None and (problem := p.messages_problem(msg.messages)):
        raise SubmitError("invalid_request", problem)
    if max_prompt_chars is None:
        return
    num_chars = len(msg.prompt or "") + sum(
        len(m.content) + len(m.role) for m in msg.messages or ()
    )
    if num_chars > max_prompt_chars:
        raise SubmitError(
            "prompt_too_long",
            f"request rejected: the prompt has {num_chars:,} characters, more than the model's "
            f"context could hold ({max_prompt_chars:,}): shorten it",
        )


class _Peek(msgspec.Struct):
    request_id: str | None = None


_peek_decoder = msgspec.msgpack.Decoder(_Peek)


def peek_request_id(frame: bytes) -> str | None:
    """Best effort: the request id of a frame that failed validation, so the client can match
    the error. Decodes only that field (others are skipped, never built)."""
    try:
        return _peek_decoder.decode(frame).request_id
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None  # not a map, or no string request_id: the reply carries none


def validate_submit(msg: p.Submit, prompt_ids: list[int], limits: Limits) -> None:
    """Raise SubmitError if the request cannot be served as asked."""
    bad = "invalid_request"
    if not prompt_ids:
        raise SubmitError(bad, "the prompt is empty: send at least one token")
    problem = msg.problem()  # the sampling parameters' ranges, as the client checks them
    if problem:
        raise SubmitError(bad, problem)
    if msg.max_tokens > limits.max_gen_len:
        raise SubmitError(
            bad,
            f"max_tokens {msg.max_tokens:,} exceeds this engine's maximal generation length "
            f"{limits.max_gen_len:,} (--max-gen-len): ask for fewer tokens",
        )
    if msg.deadline_s is not None and not 0.0 < msg.deadline_s < float("inf"):
        raise SubmitError(
            bad, f"deadline_s must be a positive number of seconds; got {msg.deadline_s}"
        )
    if min(prompt_ids) < 0 or max(prompt_ids) >= limits.vocab_size:  # builtins: C speed per token
        raise SubmitError(bad, f"prompt_ids must be token ids in [0, {limits.vocab_size})")
    total = len(prompt_ids) + msg.max_tokens
    if total > limits.max_context_len:
        raise SubmitError(
            "prompt_too_long",
            f"request rejected: prompt has {len(prompt_ids):,} tokens and max_tokens is "
            f"{msg.max_tokens:,} ({total:,} in all); the model accepts {limits.max_context_len:,}",
        )
