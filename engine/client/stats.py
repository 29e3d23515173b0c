"""AsyncStatsSubscriber: the broker's published StatsSnapshot stream, for the dashboard."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from engine.addresses import connect_address
from engine.client.inflight import check_timeout
from engine.curve import ClientKeys
from engine.links import reconnect_backoff
from engine.protocol import ProtocolError, StatsSnapshot, decode_client_reply

log = logging.getLogger(__name__)

DEFAULT_STATS_ADDR = "tcp://127.0.0.1:5557"


class AsyncStatsSubscriber:
    """A SUB socket on the broker's stats PUB socket.

    The broker need not exist yet, and may come and go: ZeroMQ reconnects by itself (with
    backoff, engine/links.py) and subscribes again, and ``recv`` simply returns None while
    nothing arrives. ``latest_only`` (default) keeps only
    the newest snapshot queued, which is what a dashboard wants.
    """

    def __init__(
        self,
        addr: str = DEFAULT_STATS_ADDR,
        *,
        latest_only: bool = True,
        context: zmq.asyncio.Context | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        self.addr = addr = connect_address(addr, DEFAULT_STATS_ADDR)  # HOST:PORT too
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.linger = 0
        if latest_only:
            self._sock.setsockopt(zmq.CONFLATE, 1)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        reconnect_backoff(self._sock)
        if curve is not None:  # a broker started with --curve (docs/PROTOCOL.md, section 12)
            curve.apply(self._sock)
        try:
            self._sock.connect(addr)
        except zmq.ZMQError as exc:
            self.close()
            raise ValueError(
                f"cannot connect to {addr!r} ({exc}): pass an address such as "
                f"{DEFAULT_STATS_ADDR!r}"
            ) from None

    async def recv(self, timeout_s: float | None = None) -> StatsSnapshot | None:
        """The next snapshot, or None if none came within ``timeout_s`` (None: wait forever).
        Frames that are not a StatsSnapshot are logged and skipped."""
        if self._sock.closed:
            raise RuntimeError("this stats subscriber is closed: create a new one")
        check_timeout("timeout_s", timeout_s)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - loop.time()) * 1000))
            if not await self._sock.poll(wait_ms, zmq.POLLIN):
                return None
            frame = await self._sock.recv()
            try:
                msg = decode_client_reply(frame)
            except ProtocolError as exc:
                log.warning("skipped a stats frame from %s: %s", self.addr, exc.message)
                continue
            if isinstance(msg, StatsSnapshot):
                return msg
            log.warning("skipped a %s message on the stats stream", type(msg).__name__)

    def close(self) -> None:
        """Close the socket (linger 0). Safe to call twice."""
        self._sock.close(linger=0)
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    async def __aenter__(self) -> AsyncStatsSubscriber:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


async def find_stats_address(
    addr: str, *, timeout_s: float = 1.5, curve: ClientKeys | None = None
) -> str | None:
    """The stats address of the broker whose *client* address is ``addr``, or None when no
    broker answers GetStats there (``addr`` is then a stats address, or no broker is up yet).

    The broker announces where it publishes (``StatsSnapshot.info.stats_addr``, as bound); the
    host is taken from ``addr``, since a broker bound to 0.0.0.0 is reached by another name.
    An older broker that announces nothing gets the default layout, the client port + 2.
    """
    from engine.addresses import tcp_host_port, with_port_offset
    from engine.client.async_client import AsyncClient
    from engine.client.errors import EngineError

    client = AsyncClient(addr, connect_timeout_s=timeout_s, curve=curve)
    try:
        snap = await client.stats(timeout_s=timeout_s)
    except EngineError:
        return None
    finally:
        await client.close()
    announced = tcp_host_port(snap.info.stats_addr) if snap.info is not None else None
    here = tcp_host_port(addr)
    if announced is None or here is None:
        return with_port_offset(addr, 2) if snap.info is None else snap.info.stats_addr
    return f"tcp://{here[0]}:{announced[1]}"
