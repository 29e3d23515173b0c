"""The dashboard's one way to the engine: a StatsSource, and its adapter over engine.client."""

from __future__ import annotations

import importlib
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
    """

    def __init__(self, addr: str, curve=None) -> None:
        self.addr = addr
        self.curve = curve  # engine.curve.ClientKeys for a broker started with --curve
        self._subscriber = None

    async def recv(self, timeout_s: float) -> StatsSnapshot | None:
        if self._subscriber is None:
            self._subscriber = _open_subscriber(self.addr, self.curve)
        return await self._subscriber.recv(timeout_s)

    def close(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            subscriber.close()


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
