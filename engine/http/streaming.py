"""A client that leaves cancels its request: a server-sent-event response and a waiter that
both watch the connection while the engine works, and stop the engine's request at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and similar proxies: pass each event on at once
]


class ClientGone(Exception):
    """The HTTP client closed its connection before the answer was ready."""


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (once its body has been read, the server's receive()
    blocks until then)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, task: asyncio.Future[T]) -> T:
    """Wait for ``task``; if the client leaves first, raise ClientGone and leave ``task``
    running, for the caller to stop (and count what it did). If this wait is itself cancelled
    (server shutdown), ``task`` is cancelled too."""
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()  # the client library then cancels the request on the engine
        await asyncio.gather(task, return_exceptions=True)
        raise
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task not in done:
        raise ClientGone()
    return task.result()


class EventStream:
    """An ASGI response that sends ``events`` (bytes, one SSE event each) as they come and
    calls ``on_close(finished)`` exactly once at the end: ``finished`` is False when the client
    left (or the server stopped) before the last event was sent."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[bool], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        self.events = events
        self.on_close = on_close
        self.headers = SSE_HEADERS + [
            (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False
        sender = asyncio.ensure_future(self._send_all(send))
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finished = sender.done() and not sender.cancelled()
            if finished:
                sender.result()  # a bug in the events iterator is raised, not swallowed
        finally:
            for t in (sender, watcher):
                t.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            await self.events.aclose()  # type: ignore[attr-defined]
            await self.on_close(finished)

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
