"""A real gateway (uvicorn on a free loopback port) in a thread of the test process, in front
of a real engine; stopped and joined under a timeout, so that a bug fails a test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator

import uvicorn

from engine.http.app import build_app
from engine.http.config import GatewayConfig
from engine.http.gateway import Gateway
from engine.http.server import bind, uvicorn_config
from engine.launcher import LocalEngine
from engine.tokenizer import TextCodec


class GatewayThread:
    """``with GatewayThread(cfg) as gw: gw.url``: the app served as `run.py http` serves it."""

    def __init__(self, cfg: GatewayConfig, codec: TextCodec) -> None:
        self.cfg = cfg
        self.gateway = Gateway(cfg, codec)
        self.sock = bind(cfg.bind, 0)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn_config(build_app(self.gateway), cfg, "error"))
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start()
            self._error = exc

    def start(self, timeout_s: float = 30.0) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the gateway did not start: {self._error!r}")
            assert time.monotonic() < deadline, "the gateway did not start in time"
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until the stats stream says a worker is up (what /health says)."""
        deadline = time.monotonic() + timeout_s
        while self.gateway.unavailable() is not None:
            assert time.monotonic() < deadline, f"not ready: {self.gateway.unavailable()}"
            time.sleep(0.05)

    def call(self, coro, timeout_s: float = 10.0):
        """Run a coroutine on the gateway's loop (to inspect it from the test's thread)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def num_tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # not this one

        return self.call(count())

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=20)
        self.sock.close()
        assert not self._thread.is_alive(), "the gateway thread did not stop"

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def gateway_for(engine: LocalEngine, model_dir, **overrides) -> Iterator[GatewayThread]:
    cfg = GatewayConfig(
        connect=engine.client_addr,
        stats_connect=engine.stats_addr,
        model=str(model_dir),
        served_model_name="tiny",
        header_timeout_s=1.0,
        body_timeout_s=1.0,
        stats_stale_s=2.0,
    )
    cfg = dataclasses.replace(cfg, **overrides)
    with GatewayThread(cfg, TextCodec.load(str(model_dir))) as gw:
        yield gw


def num_open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
