"""OpenAI response bodies and stream chunks for a completion or a chat completion, built from
what the client library returns (GenerateResult, TokenDelta)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from engine.client import GenerateResult, Usage
from engine.http.errors import APIError

#: The engine's finish reasons as OpenAI reports them ("cancelled" is vLLM's "abort").
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


def finish_reason(result: GenerateResult) -> str:
    if result.finish_reason not in FINISH_REASONS:  # "error": the engine failed it midway
        raise APIError(500, "internal", f"the engine failed request {result.request_id!r}")
    return FINISH_REASONS[result.finish_reason]


def usage(u: Usage) -> dict:
    """OpenAI's usage object; prompt tokens served from the prefix cache as OpenAI reports them
    (``prompt_tokens_details.cached_tokens``)."""
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def engine_extra(result: GenerateResult) -> dict:
    """The engine's own figures, as the extra field "scls" (ignored by OpenAI clients):
    seconds from the broker's receipt, and how many slices served the request."""
    t = result.timings
    return {
        "request_id": result.request_id,
        "queued_s": t.queued_s,
        "first_token_s": t.first_token_s,
        "finished_s": t.finished_s,
        "num_slices": result.num_slices,
    }


@dataclass(slots=True)
class Shape:
    """One response's identity: a chat or a plain completion, its id (the caller's request
    id), model and time; ``include_usage``: a stream whose last chunk carries the usage (every
    chunk before it then has ``"usage": null``, as OpenAI's)."""

    chat: bool
    request_id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.request_id}"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def body(self, result: GenerateResult) -> dict:
        """The whole (non-streamed) response."""
        reason = finish_reason(result)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"index": 0, "text": result.text}
        choice |= {"logprobs": None, "finish_reason": reason}
        return self._head("chat.completion" if self.chat else "text_completion") | {
            "choices": [choice],
            "usage": usage(result.usage),
            "scls": engine_extra(result),
        }

    def chunk(self, text: str | None, reason: str | None = None, *, role: bool = False) -> dict:
        """One streamed chunk: new text, or the last one with the finish reason."""
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"logprobs": None, "finish_reason": reason}
        chunk = self._head("chat.completion.chunk" if self.chat else "text_completion")
        chunk["choices"] = [choice]
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, u: Usage) -> dict:
        """stream_options.include_usage: the last chunk, with no choices."""
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {
            "choices": [],
            "usage": usage(u),
        }


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    payload = data.encode() if isinstance(data, str) else msgspec.json.encode(data)
    return b"data: " + payload + b"\n\n"


DONE = sse("[DONE]")
