"""The dashboard's one way to the engine: a StatsSource, and its adapter over engine.client."""

from __future__ import annotations

import importlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from engine.protocol import StatsSnapshot


class StatsSourceUnavailable(RuntimeError):
    """The stats subscriber cannot be created (the client module is missing or too old)."""


@runtime_checkable
class StatsSource(Protocol):
    """A stream of broker snapshots.

    ``recv`` waits at most ``timeout_s`` seconds and returns the next snapshot, or None when
    none came in time (no broker, or a silent one); it never raises for a missing broker,
    since ZeroMQ reconnects by itself. ``close`` is idempotent and releases the socket.
    """

    async def recv(self, timeout_s: float) -> StatsSnapshot | None: ...

    def close(self) -> None: ...


class SubscriberSource:
    """StatsSource over ``engine.client.AsyncStatsSubscriber`` on the broker's PUB address.

    The client is imported and the subscriber created on the first ``recv``, inside the
    running event loop (asyncio ZeroMQ sockets belong to the loop that uses them).

    ``addr`` may be the broker's stats address or its client address, and no broker need be
    up yet: until a snapshot arrives, the source asks ``addr`` where the broker publishes
    (``find``, by default engine.client.stats.find_stats_address) after ``first_probe_s`` of
    silence, then again with backoff (doubling up to ``max_backoff_s``), and subscribes there
    once a broker answers. ``addr`` is then the address it subscribes to.
    """

    def __init__(
        self,
        addr: str,
        curve=None,
        *,
        find: Callable[..., Awaitable[str | None]] | None = None,
        first_probe_s: float = 1.0,
        max_backoff_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addr = addr  # where it subscribes
        self.given_addr = addr  # what it was told: asked where the stats are
        self.curve = curve  # engine.curve.ClientKeys for a broker started with --curve
        self._find = find
        self._first_probe_s, self._max_backoff_s = first_probe_s, max_backoff_s
        self._clock = clock
        self._subscriber = None
        self._heard = False  # a snapshot came on self.addr: no more asking
        self._probe_at: float | None = None  # monotonic s of the next question
        self._backoff_s = first_probe_s

    async def recv(self, timeout_s: float) -> StatsSnapshot | None:
        if self._subscriber is None:
            self._subscriber = _open_subscriber(self.addr, self.curve)
        if self._probe_at is None:
            self._probe_at = self._clock() + self._first_probe_s
        snapshot = await self._subscriber.recv(timeout_s)
        if snapshot is not None:
            self._heard = True
        elif not self._heard and self._clock() >= self._probe_at:
            await self._ask_where_stats_are()
        return snapshot

    async def _ask_where_stats_are(self) -> None:
        """One question to ``given_addr`` (a client address answers with the stats address);
        on an answer elsewhere, subscribe there instead."""
        find = self._find or _find_stats_address
        found = await find(self.given_addr, curve=self.curve)
        self._probe_at = self._clock() + self._backoff_s
        self._backoff_s = min(2 * self._backoff_s, self._max_backoff_s)
        if found is not None and found != self.addr:
            self.close()
            self.addr = found
            self._subscriber = _open_subscriber(found, self.curve)

    def close(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            subscriber.close()


async def _find_stats_address(addr: str, curve=None) -> str | None:
    """engine.client.stats.find_stats_address, or None when the client does not have it."""
    try:
        find = importlib.import_module("engine.client.stats").find_stats_address
    except (ImportError, AttributeError):
        return None
    return await find(addr, curve=curve)


def _open_subscriber(addr: str, curve=None):
    try:
        client = importlib.import_module("engine.client")
        subscriber_cls = client.AsyncStatsSubscriber
    except (ImportError, AttributeError) as exc:
        raise StatsSourceUnavailable(
            f"cannot subscribe to {addr}: engine.client.AsyncStatsSubscriber is not available "
            f"({exc}); reinstall the package with `make install`"
        ) from exc
    return subscriber_cls(addr, curve=curve) if curve is not None else subscriber_cls(addr)
