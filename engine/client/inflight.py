"""The client's record of one request in flight: its deadline and an inbox of its replies."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any


class Inflight:
    """Replies of one request, in arrival order, plus what the reader learned on the way.

    Only the event loop thread touches it. ``done``: the request ended (Finished, Error, or
    the client gave up on it) and the reader no longer routes to it.
    """

    def __init__(self, request_id: str, timeout_s: float | None, deadline: float | None) -> None:
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.deadline = deadline  # loop.time() by which it must finish; None: no limit
        self.accepted = False
        self.prompt_tokens: int | None = None
        self.num_tokens = 0  # tokens received in Delta messages
        self.done = False
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Any) -> None:
        self._items.append(item)
        self._ready.set()

    def unget(self, item: Any) -> None:
        self._items.appendleft(item)
        self._ready.set()

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def check_timeout(name: str, value: float | None, *, none_ok: bool = True) -> float | None:
    """A timeout in seconds: a positive finite number (or None when ``none_ok``)."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{name} must be > 0 seconds, got {value}" + (" (None: no limit)" if none_ok else "")
        )
    return float(value)
