"""Typed refusals of a request, shared by the broker, the tokenizer and the HTTP gateway: each
carries the protocol's error code and a message that says what to change."""

from __future__ import annotations

from engine import protocol as p


class SubmitError(Exception):
    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def error(self, request_id: str | None) -> p.Error:
        return p.Error(
            code=self.code,
            message=self.message,
            request_id=request_id,
            retry_after_s=self.retry_after_s,
        )
