"""The client's exceptions: one base class, and one subclass per way a request can fail."""

from __future__ import annotations

from engine.protocol import Error

#: Error codes that mean "try again later" rather than "change the request".
RETRYABLE_CODES = frozenset({"no_workers", "overloaded"})


class EngineError(Exception):
    """Base class of every error the client raises about the engine (not about its arguments:
    those raise ValueError before anything is sent)."""


class RequestRejected(EngineError):
    """The broker answered with an Error message.

    ``code`` is one of ``engine.protocol.ERROR_CODES`` (see docs/PROTOCOL.md); ``message`` is
    the broker's explanation of what to change; ``request_id`` is None when the broker could
    not tell which request the error was about.
    """

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        where = f"request {request_id!r}" if request_id is not None else "request"
        super().__init__(f"{where} rejected ({code}): {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s  # with "overloaded": the broker's estimate

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later (no worker yet, engine overloaded)."""
        return self.code in RETRYABLE_CODES

    @classmethod
    def from_error(cls, error: Error) -> RequestRejected:
        return cls(error.code, error.message, error.request_id, error.retry_after_s)


class InvalidRequest(RequestRejected, ValueError):
    """The client rejected a request before sending it, with the code the broker would use
    ("invalid_request", "duplicate_request_id"): one ``except RequestRejected`` (or
    ValueError) covers both places."""

    def __init__(
        self, message: str, request_id: str | None = None, code: str = "invalid_request"
    ) -> None:
        EngineError.__init__(self, f"invalid request: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class RequestTimeout(EngineError, TimeoutError):
    """A request did not finish within its ``timeout_s``; the client asked the engine to cancel
    it, so no capacity stays reserved for it."""

    def __init__(self, request_id: str, timeout_s: float, num_received_tokens: int = 0) -> None:
        super().__init__(
            f"request {request_id!r} did not finish within timeout_s={timeout_s:g} s "
            f"({num_received_tokens} tokens received); it was cancelled on the engine. "
            "Pass a larger timeout_s, or a smaller max_tokens."
        )
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.num_received_tokens = num_received_tokens


class Disconnected(EngineError, ConnectionError):
    """No broker answered at ``addr``, or the connection to it was lost mid-request.

    ``reason``: "unreachable" (nothing accepted the connection in time), "no_answer" (a peer
    accepted it but did not answer: not the broker's client address?), "lost" (the connection
    closed while the request was in flight, and no broker answered again within the client's
    ``resume_timeout_s``) or "diverged" (a broker that came back without the request ran it
    anew and it came out differently from what had arrived, so it cannot be continued).
    """

    def __init__(
        self, addr: str, message: str, request_id: str | None = None, reason: str = "unreachable"
    ) -> None:
        super().__init__(message)
        self.addr = addr
        self.request_id = request_id
        self.reason = reason


class ClientClosed(EngineError):
    """The client was used after ``close()``."""

    def __init__(self) -> None:
        super().__init__("this client is closed: create a new one (or use it as a context manager)")
