"""AsyncStatsSubscriber: None while no broker publishes, snapshots once one does, across
restarts of the publisher; frames that are not snapshots are skipped."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio
from scripted_broker import run, snapshot

from engine import protocol as p
from engine.client import AsyncStatsSubscriber


class Publisher:
    """A stand-in for the broker's PUB socket. XPUB tells when the subscription arrived, so a
    snapshot is published only once it can be delivered (no slow-joiner sleeps)."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str) -> None:
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.linger = 0
        self.sock.bind(addr)

    async def wait_for_subscriber(self) -> None:
        assert await self.sock.poll(5000), "no subscription within 5 s"
        assert (await self.sock.recv())[:1] == b"\x01"

    async def publish(self, *frames: bytes) -> None:
        for frame in frames:
            await self.sock.send(frame)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


def test_recv_returns_none_while_no_broker_exists(tmp_path):
    async def main():
        sub = AsyncStatsSubscriber(f"ipc://{tmp_path}/stats")
        try:
            return await sub.recv(timeout_s=0.2)
        finally:
            sub.close()
            sub.close()

    assert run(main()) is None


def test_snapshots_arrive_across_a_broker_restart(tmp_path, ctx):
    addr = f"ipc://{tmp_path}/stats"

    async def main():
        async with AsyncStatsSubscriber(addr) as sub:
            got = []
            for num_waiting in (1, 2):  # two broker lives on the same address
                # recv runs meanwhile, as a dashboard's does: libzmq re-subscribes after a
                # reconnect only when the application uses its SUB socket.
                received = asyncio.ensure_future(sub.recv(timeout_s=5))
                pub = Publisher(ctx, addr)
                await pub.wait_for_subscriber()
                await pub.publish(p.encode(snapshot(num_waiting=num_waiting)))
                got.append(await received)
                pub.close()
            return got

    assert [s.num_waiting for s in run(main())] == [1, 2]


def test_frames_that_are_not_snapshots_are_skipped(tmp_path, ctx):
    addr = f"ipc://{tmp_path}/stats"

    async def main():
        pub = Publisher(ctx, addr)
        async with AsyncStatsSubscriber(addr, latest_only=False) as sub:
            await pub.wait_for_subscriber()
            await pub.publish(
                b"\xc1 garbage",
                p.encode(p.Accepted(request_id="r", prompt_tokens=1)),
                p.encode(snapshot(num_running=9)),
            )
            first = await sub.recv(timeout_s=5)
            return first, await sub.recv(timeout_s=0.1)
        pub.close()

    first, nothing_more = run(main())
    assert first.num_running == 9 and nothing_more is None


def test_latest_only_keeps_the_newest_snapshot(tmp_path, ctx):
    addr = f"ipc://{tmp_path}/stats"

    async def main():
        pub = Publisher(ctx, addr)
        async with AsyncStatsSubscriber(addr) as sub:
            await pub.wait_for_subscriber()
            await pub.publish(*(p.encode(snapshot(num_finished=i)) for i in range(20)))
            await sub.recv(timeout_s=5)  # whatever arrived first, then only the newest is kept
            latest = await sub.recv(timeout_s=0.5)
            pub.close()
            return latest

    latest = run(main())
    assert latest is None or latest.num_finished == 19


def test_a_closed_subscriber_says_so():
    async def main():
        sub = AsyncStatsSubscriber()
        sub.close()
        with pytest.raises(RuntimeError, match="closed"):
            await sub.recv(0.1)

    run(main())
