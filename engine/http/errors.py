"""OpenAI error objects: one exception type for every refusal, and the HTTP status of each
engine error code (docs/PROTOCOL.md, section 6)."""

from __future__ import annotations

import math
import re

from engine.client import Disconnected, EngineError, RequestRejected, RequestTimeout

#: The engine's error codes and the HTTP status each becomes.
STATUS_OF_CODE = {
    "invalid_request": 400,
    "prompt_too_long": 400,
    "malformed": 400,
    "duplicate_request_id": 409,
    "unknown_request": 404,
    "overloaded": 429,
    "deadline_exceeded": 504,
    "shutting_down": 503,
    "internal": 500,
    "resumed_elsewhere": 409,
}

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

#: Request fields an error message may start with: reported as the error's "param".
PARAMS = frozenset(
    "model prompt messages max_tokens max_completion_tokens temperature top_p top_k seed stop "
    "ignore_eos stream stream_options n tokens request_id".split()
)


class APIError(Exception):
    """A request the gateway refuses: ``status``, OpenAI's ``type``, the engine's (or the
    gateway's) machine-readable ``code``, a message that says what to change, and the request
    field it is about (``param``) when one is."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param if param is not None else _param_of(message)
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        fallback = "server_error" if self.status >= 500 else "invalid_request_error"
        return _TYPE_OF_STATUS.get(self.status, fallback)

    def body(self) -> dict:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``, as OpenAI's."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def from_engine(exc: EngineError, request_timeout_s: float | None = None) -> APIError:
    """The HTTP form of an error the client library raised; ``request_timeout_s``: the
    gateway's --request-timeout, named in a 504 instead of the client library's timeout_s
    (which an HTTP caller never sent)."""
    if isinstance(exc, RequestRejected):  # also InvalidRequest (checked before sending)
        status = STATUS_OF_CODE.get(exc.code, 500)
        # InvalidRequest (refused before sending) has no retry_after_s attribute
        retry_after_s = getattr(exc, "retry_after_s", None)
        return APIError(status, exc.code, exc.message, retry_after_s=retry_after_s)
    if isinstance(exc, RequestTimeout):
        if request_timeout_s is None:
            return APIError(504, "deadline_exceeded", str(exc))
        return APIError(
            504,
            "deadline_exceeded",
            f"the request did not finish within this server's request time limit of "
            f"{request_timeout_s:g} s (the gateway's --request-timeout) and was cancelled on "
            'the engine: ask for a smaller max_tokens, or stream the answer ("stream": true) '
            "to receive its tokens as they come",
        )
    if isinstance(exc, Disconnected):
        return APIError(503, "engine_unreachable", str(exc))
    return APIError(500, "internal", str(exc))


def bad_request(message: str, *, param: str | None = None) -> APIError:
    return APIError(400, "invalid_request", message, param=param)


def _param_of(message: str) -> str | None:
    """The field a message names first ("max_tokens must be ..." or "... at `$.top_p`")."""
    at = re.search(r"at `\$\.([a-z_]+)", message)
    if at and at.group(1) in PARAMS:
        return at.group(1)
    first = re.match(r"([a-z_]+)", message)
    return first.group(1) if first and first.group(1) in PARAMS else None
