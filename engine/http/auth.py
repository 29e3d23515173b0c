"""Optional bearer-token authentication of the API routes (/v1/*, /tokenize, /detokenize);
/health, /version and /metrics stay open for probes and scrapers."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import msgspec
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.http.errors import APIError

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
#: Where a request's scope carries the id space of the caller's key (see key_scope).
KEY_SCOPE_STATE = "key_scope"


def key_scope(key: bytes) -> str:
    """A short, stable name of an API key that does not reveal it: the prefix of the engine
    request ids of its callers, so that callers with different keys never share an id (a
    request id is a resume and replay key on the engine, docs/HTTP.md)."""
    return "k" + hashlib.blake2b(key, digest_size=6, person=b"scls-key").hexdigest()


class KeyFileError(ValueError):
    """An API key file that cannot be used; the message says what to fix."""


def load_keys(path: str) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read the API key file {path!r}: {exc.strerror}") from None
    keys = tuple(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    if not keys:
        raise KeyFileError(f"the API key file {path!r} holds no key: write one key per line")
    return keys


class BearerAuth:
    """ASGI middleware: a protected route needs ``Authorization: Bearer <one of keys>``."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        key = self._matching_key(scope)
        if key is not None:
            scope.setdefault("state", {})[KEY_SCOPE_STATE] = key_scope(key)
            await self.app(scope, receive, send)
            return
        error = APIError(
            401,
            "invalid_api_key",
            "missing or wrong API key: send the header `Authorization: Bearer <key>`",
        )
        body = msgspec.json.encode(error.body())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _matching_key(self, scope: Scope) -> bytes | None:
        """The key the request's bearer token is, or None."""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return None
                token = token.strip()
                # compare with every key, in constant time per key: no early exit on a match
                matches = [hmac.compare_digest(token, key) for key in self.keys]
                return self.keys[matches.index(True)] if any(matches) else None
        return None
