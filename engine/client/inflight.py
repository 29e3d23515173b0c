"""The client's record of one request in flight: its deadline, an inbox of its replies, and
what it needs to resume after the broker went away (the Submit to send again, what arrived)."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any

from engine.protocol import Delta


class Diverged(Exception):
    """A resubmitted request's replay differs from what had arrived before (not resumable)."""


class Inflight:
    """Replies of one request, in arrival order, plus what the reader learned on the way.

    Only the event loop thread touches it. ``done``: the request ended (Finished, Error, or
    the client gave up on it) and the reader no longer routes to it.
    """

    def __init__(
        self, request_id: str, timeout_s: float | None, deadline: float | None, frame: bytes = b""
    ) -> None:
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.deadline = deadline  # loop.time() by which it must finish; None: no limit
        self.frame = frame  # the Submit as sent: sent again, unchanged, to resume the request
        self.accepted = False
        self.prompt_tokens: int | None = None
        self.done = False
        self.lost = False  # in flight when the connection dropped: resubmitted when it is back
        self.resubmitted = False  # sent again after a reconnect (AsyncClient._on_connection_back)
        self.received = Received()
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()

    @property
    def num_tokens(self) -> int:
        """Tokens received in Delta messages (each once, whatever was resubmitted)."""
        return len(self.received.token_ids)

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


class Received:
    """The token ids and text of the Deltas that arrived, in order. After a resubmission the
    broker's stream starts again from the first token (a catch-up Delta, or the tokens
    generated anew): ``take`` checks that replay against what arrived, drops it, and passes
    only what is new, so the stream carries each token exactly once."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self._replay_ids = 0  # of token_ids, how many the replay has yet to repeat
        self._replay_chars = 0  # the same for the text, in characters

    def replay(self) -> None:
        """The request was resubmitted: its stream repeats everything from the start."""
        self._replay_ids, self._replay_chars = len(self.token_ids), len(self.text)

    def take(self, delta: Delta) -> Delta | None:
        """The new part of ``delta`` (None if nothing is new); raises Diverged when its
        repeated part differs from what arrived before."""
        ids = self._check(delta.token_ids, self.token_ids, self._replay_ids)
        text = self._check(delta.text, self.text, self._replay_chars)
        self._replay_ids -= len(delta.token_ids) - len(ids)
        self._replay_chars -= len(delta.text) - len(text)
        self.token_ids += ids
        self.text += text
        if len(ids) == len(delta.token_ids) and len(text) == len(delta.text):
            return delta  # nothing repeated
        if not ids and not text:
            return None  # all of it repeated
        return Delta(request_id=delta.request_id, text=text, token_ids=list(ids))

    @staticmethod
    def _check(new, had, num_replayed: int):
        """``new`` without its first part that repeats the last ``num_replayed`` items of
        ``had`` (which it must equal)."""
        n = min(len(new), num_replayed)
        start = len(had) - num_replayed
        if new[:n] != had[start : start + n]:
            raise Diverged()
        return new[n:]


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
