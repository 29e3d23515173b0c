"""The adapter from the dashboard's StatsSource to engine.client, with a fake and a real client."""

from __future__ import annotations

import importlib
import sys
import time
import types

import pytest
from tui_stub import snapshot

from tui.source import StatsSource, StatsSourceUnavailable, SubscriberSource


class FakeSubscriber:
    instances: list[FakeSubscriber] = []

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.closed = False
        self.timeouts: list[float] = []
        FakeSubscriber.instances.append(self)

    async def recv(self, timeout_s: float):
        self.timeouts.append(timeout_s)
        return snapshot(uptime_s=1.0)

    def close(self) -> None:
        self.closed = True


def _real_subscriber_available() -> bool:
    try:
        return hasattr(importlib.import_module("engine.client"), "AsyncStatsSubscriber")
    except ImportError:
        return False


async def test_adapter_opens_lazily_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_client = types.ModuleType("engine.client")
    fake_client.AsyncStatsSubscriber = FakeSubscriber
    monkeypatch.setitem(sys.modules, "engine.client", fake_client)
    FakeSubscriber.instances.clear()

    source = SubscriberSource("tcp://127.0.0.1:9")
    assert isinstance(source, StatsSource)
    assert FakeSubscriber.instances == []  # nothing opened before the first recv
    snap = await source.recv(0.25)
    assert snap is not None and snap.uptime_s == 1.0
    (subscriber,) = FakeSubscriber.instances
    assert subscriber.addr == "tcp://127.0.0.1:9" and subscriber.timeouts == [0.25]
    source.close()
    source.close()
    assert subscriber.closed


async def test_adapter_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "engine.client", None)  # import fails
    with pytest.raises(StatsSourceUnavailable, match="AsyncStatsSubscriber is not available"):
        await SubscriberSource("tcp://127.0.0.1:9").recv(0.1)


@pytest.mark.skipif(not _real_subscriber_available(), reason="engine.client not there yet")
async def test_dashboard_over_a_real_pub_socket() -> None:
    import zmq

    from engine.protocol import encode
    from tui.app import DashboardApp

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        addr = f"tcp://127.0.0.1:{port}"
        app = DashboardApp(SubscriberSource(addr), address=addr, recv_timeout_s=0.05)
        frame = encode(snapshot(num_waiting=17))
        async with app.run_test(size=(150, 45)) as pilot:
            deadline = time.monotonic() + 10
            # PUB drops frames until the subscription arrives: publish until one is shown.
            while app.shown is None:
                assert time.monotonic() < deadline, "no snapshot came through ZeroMQ"
                pub.send(frame)
                await pilot.pause(0.05)
            assert app.shown.num_waiting == 17
        assert app.source._subscriber is None  # closed on exit
    finally:
        pub.close(linger=0)
        ctx.term()


class SilentSubscriber:
    """Nothing ever arrives: a broker that is not up, or an address that is not its stats."""

    instances: list[SilentSubscriber] = []

    def __init__(self, addr: str) -> None:
        self.addr, self.closed = addr, False
        SilentSubscriber.instances.append(self)

    async def recv(self, timeout_s: float):
        return snapshot(uptime_s=2.0) if self.addr == "tcp://127.0.0.1:7" else None

    def close(self) -> None:
        self.closed = True


async def test_adapter_keeps_asking_where_the_stats_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a client address while no broker is up, it asks again (with backoff) until the
    broker answers, then subscribes to the stats address it names."""
    fake_client = types.ModuleType("engine.client")
    fake_client.AsyncStatsSubscriber = SilentSubscriber
    monkeypatch.setitem(sys.modules, "engine.client", fake_client)
    SilentSubscriber.instances.clear()
    now = [0.0]
    asked: list[tuple[float, str]] = []

    async def find(addr: str, curve=None):
        asked.append((now[0], addr))
        return "tcp://127.0.0.1:7" if len(asked) >= 4 else None  # the broker is up at last

    source = SubscriberSource(
        "tcp://127.0.0.1:5", find=find, first_probe_s=1.0, max_backoff_s=4.0, clock=lambda: now[0]
    )
    received = None
    for _ in range(200):
        received = await source.recv(0.0)
        if received is not None:
            break
        now[0] += 0.5
    assert received is not None and received.uptime_s == 2.0
    assert [when for when, _ in asked] == [1.0, 2.0, 4.0, 8.0]  # backoff 1, 2, 4 s
    assert {addr for _, addr in asked} == {"tcp://127.0.0.1:5"}
    first, second = SilentSubscriber.instances
    assert first.closed and second.addr == source.addr == "tcp://127.0.0.1:7"
    await source.recv(0.0)
    now[0] += 100.0
    await source.recv(0.0)
    assert len(asked) == 4  # heard from the stats address: no more asking
    source.close()
