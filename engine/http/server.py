"""Runs the gateway: loads the tokenizer, binds the port, serves the app with uvicorn (h11),
with a deadline on every request's headers so that slow clients cannot hold connections."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import prometheus_client
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.http.app import build_app
from engine.http.config import GatewayConfig
from engine.http.gateway import Gateway
from engine.tokenizer import TextCodec

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


class GatewayStartError(RuntimeError):
    """The gateway cannot start (model, port, key file); the message says what to change."""


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, but a connection that has not sent a whole request head within
    ``timeout_s`` (after connecting, or after its previous response) is closed."""

    class HeaderDeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._waiting_for_head():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._waiting_for_head():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol


class GatewayServer(uvicorn.Server):
    """uvicorn's server, except that after a graceful stop on SIGINT or SIGTERM the process
    exits with status 0, as the broker and the workers do (uvicorn re-raises the signal)."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so. Without
    # it a response's head and body (two writes) wait for a delayed ACK: 40 ms per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise GatewayStartError(
            f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port "
            "(0: any free port) or --bind"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def uvicorn_config(app, cfg: GatewayConfig, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=header_deadline_protocol(cfg.header_timeout_s),
        lifespan="on",
        limit_concurrency=cfg.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        log_level=log_level,
        access_log=False,
    )


def run_gateway(cfg: GatewayConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM (then in-flight requests get a few seconds to end, and
    those still running are cancelled on the engine). Raises GatewayStartError."""
    from engine.models import ModelNotFoundError

    try:
        codec = TextCodec.load(cfg.model)
    except (ModelNotFoundError, OSError) as exc:
        raise GatewayStartError(
            f"cannot load the tokenizer of --model {cfg.model!r}: {exc}"
        ) from None
    sock = bind(cfg.bind, cfg.port)
    host, port = sock.getsockname()[:2]
    if not cfg.is_loopback and not cfg.api_keys:
        log.warning(
            "the HTTP API listens on %s without authentication: anyone who reaches this "
            "address can use the engine; pass --api-key or --api-key-file",
            cfg.bind,
        )
    prometheus_client.disable_created_metrics()  # vLLM's exposition has no *_created series
    gateway = Gateway(cfg, codec)
    server = GatewayServer(uvicorn_config(build_app(gateway), cfg))
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():  # its signal handlers are set by then
            await asyncio.sleep(0.02)
        if server.started and on_ready is not None:
            on_ready(url)
        await task

    try:
        asyncio.run(serve())
    finally:
        sock.close()
    if not server.started:  # uvicorn logged why
        raise GatewayStartError("the HTTP gateway did not start: see the log above")
