"""Starts a broker: tokenizer, policy, core and ZeroMQ server, until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from engine.broker.core import BrokerCore
from engine.broker.server import BrokerServer
from engine.broker.validation import Limits
from engine.config import BrokerConfig
from engine.scheduler.factory import make_policy
from engine.tokenizer import TextCodec

log = logging.getLogger(__name__)


def build_server(cfg: BrokerConfig, codec: TextCodec | None = None) -> BrokerServer:
    codec = codec or TextCodec.load(cfg.model)
    limits = Limits(
        max_context_len=codec.max_context_len,
        max_gen_len=cfg.scheduler.max_gen_len,
        vocab_size=codec.vocab_size,
    )
    core = BrokerCore(cfg.scheduler, make_policy(cfg.scheduler), codec.decode, limits)
    return BrokerServer(cfg, core, codec)


async def serve_broker(
    cfg: BrokerConfig,
    on_ready: Callable[[BrokerServer], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set or the process gets SIGINT/SIGTERM."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread: the caller owns ``stop``
            pass
    codec = await asyncio.to_thread(TextCodec.load, cfg.model)
    server = build_server(cfg, codec)
    task = asyncio.create_task(server.run(stop))
    await server.ready.wait()
    if on_ready is not None:
        on_ready(server)
    await task
