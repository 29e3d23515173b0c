"""Reading a request body within a size limit and a time limit: an oversized body gets a 413
and a slow one a 408, both before the gateway holds more than the limit in memory."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from engine.http.errors import APIError
from engine.http.streaming import ClientGone

#: Sent with 408 and 413: the rest of the body is not read, so the connection cannot be reused.
CLOSE = {"Connection": "close"}


class BodyError(APIError):
    def headers(self) -> dict[str, str]:
        return super().headers() | CLOSE


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyError(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout_s:g} s: send it at once",
        ) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> BodyError:
    return BodyError(
        413,
        "body_too_large",
        f"the request body is larger than {max_bytes:,} bytes: shorten the prompt",
    )
