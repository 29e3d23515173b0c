"""Requests that must end without a worker's word: past their deadline, or abandoned by a client
whose connection closed and did not come back within the grace period. Pure: time passed in."""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping

from engine.broker.requests import Request


class Expiry:
    """Deadlines (a heap, entries of ended requests skipped lazily) and orphaned requests."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._deadlines: list[tuple[float, str]] = []
        self._orphaned_at: dict[str, float] = {}  # request id -> when its client left

    @property
    def num_orphans(self) -> int:
        return len(self._orphaned_at)

    def watch(self, req: Request) -> None:
        if req.deadline_at is not None:
            heapq.heappush(self._deadlines, (req.deadline_at, req.request_id))

    def orphan(self, request_id: str, now: float) -> None:
        self._orphaned_at.setdefault(request_id, now)

    def adopt(self, request_id: str) -> None:
        """A client resumed it (or it ended): it is nobody's orphan any more."""
        self._orphaned_at.pop(request_id, None)

    def due(self, now: float, live: Mapping[str, Request]) -> Iterator[tuple[Request, str]]:
        """Live requests to end now, with why: "deadline" or "abandoned"."""
        while self._deadlines and self._deadlines[0][0] <= now:
            at, request_id = heapq.heappop(self._deadlines)
            req = live.get(request_id)
            if req is not None and req.deadline_at == at:
                yield req, "deadline"
        if len(self._deadlines) > 2 * len(live) + 64:  # ended requests' entries: rebuild
            self._deadlines = [(t, r) for t, r in self._deadlines if r in live]
            heapq.heapify(self._deadlines)
        for request_id, at in list(self._orphaned_at.items()):
            if now - at >= self.grace_s:
                del self._orphaned_at[request_id]
                req = live.get(request_id)
                if req is not None:
                    yield req, "abandoned"
