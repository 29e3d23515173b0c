"""Starts a broker: tokenizer, policy, core and ZeroMQ server. The first SIGINT or SIGTERM
drains (no new requests; accepted ones finish within drain_timeout_s), a second one stops."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from engine.addresses import port_taken
from engine.broker.admission import QueueLimits
from engine.broker.core import BrokerCore
from engine.broker.journal import Journal
from engine.broker.recovery import Recovery
from engine.broker.server import BrokerServer, bind_failure
from engine.broker.validation import Limits
from engine.config import BrokerConfig
from engine.scheduler.factory import make_policy
from engine.tokenizer import TextCodec

log = logging.getLogger(__name__)

REPLAY_S = 60.0  # a journaled answer stays replayable this long after its request finished


def build_server(cfg: BrokerConfig, codec: TextCodec | None = None) -> BrokerServer:
    codec = codec or TextCodec.load(cfg.model)
    limits = Limits(
        max_context_len=codec.max_context_len,
        max_gen_len=cfg.scheduler.max_gen_len,
        vocab_size=codec.vocab_size,
    )
    queue_limits = QueueLimits(cfg.max_queued_requests, cfg.max_queued_tokens)
    policy = make_policy(cfg.scheduler)
    journal = None
    if cfg.journal_path is not None:  # JournalError: it cannot be opened (says what to change)
        journal = Journal(cfg.journal_path, replay_s=max(REPLAY_S, cfg.client_grace_s))
    core = BrokerCore(
        cfg.scheduler, policy, codec.decode, limits, queue_limits, cfg.client_grace_s, journal
    )
    server = BrokerServer(cfg, core, codec)
    if journal is not None:
        server.recovery = Recovery(journal.recover())
        server.recovery.restore(core, time.monotonic(), time.time())
    return server


def check_addresses_free(cfg: BrokerConfig) -> None:
    """Raise BrokerStartError when one of the broker's TCP ports is already taken."""
    for domain, addr in (
        ("clients", cfg.client_addr), ("workers", cfg.worker_addr), ("stats", cfg.stats_addr)
    ):  # fmt: skip
        why = port_taken(addr)
        if why is not None:
            raise bind_failure(addr, domain, why)


async def serve_broker(
    cfg: BrokerConfig,
    on_ready: Callable[[BrokerServer], None] | None = None,
    stop: asyncio.Event | None = None,
    drain: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set, or a drain (``drain`` set, or a first SIGINT/SIGTERM) ends."""
    stop, drain = stop or asyncio.Event(), drain or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if drain.is_set():
            log.warning("second signal: stopping now")
            stop.set()
        drain.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (RuntimeError, ValueError):  # not the main thread: the caller owns the events
            pass
    check_addresses_free(cfg)  # before the tokenizer loads: a taken port is said at once
    codec = await asyncio.to_thread(TextCodec.load, cfg.model)
    server = build_server(cfg, codec)
    task = asyncio.create_task(server.run(stop, drain))
    await server.ready.wait()
    if on_ready is not None:
        on_ready(server)
    await task
