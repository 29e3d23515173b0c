"""An engine on this machine in one object: a broker and N worker processes, started together
and always stopped together (serve, the demo, tests, benchmarks). The broker runs on a thread
of this process, or (``supervised``) as a child process that is restarted when it dies."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Sequence

import zmq

from engine import protocol as p
from engine.broker.main import serve_broker
from engine.broker.server import BrokerServer
from engine.config import BrokerConfig
from engine.curve import ClientKeys
from engine.supervisor import BrokerExited, SupervisedBroker, spawn, stop_all


class EngineStartError(RuntimeError):
    pass


class LocalEngine:
    """``with LocalEngine(cfg, num_workers=2, worker_args=[...]) as engine: engine.client_addr``.

    Bind addresses in ``cfg`` may use port ``*`` (any free port); the bound ones are in
    ``engine.addresses``. ``worker_args`` are extra ``run.py worker`` flags (model, budget, ...).
    ``supervised``: the broker is a SupervisedBroker process (``log_args`` its log flags,
    ``max_restarts``, ``curve``: keys to ask it how many workers joined); ``server`` is then None.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        num_workers: int = 2,
        worker_args: Sequence[str] = (),
        start_timeout_s: float = 300.0,
        supervised: bool = False,
        log_args: Sequence[str] = (),
        max_restarts: int = 5,
        curve: ClientKeys | None = None,
    ) -> None:
        self.cfg = cfg
        self.broker = SupervisedBroker(cfg, log_args, max_restarts) if supervised else None
        self.curve = curve
        self.num_workers = num_workers
        self.worker_args = list(worker_args)
        self.start_timeout_s = start_timeout_s
        self.procs: list[subprocess.Popen] = []
        self.server: BrokerServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_broker, name="broker", daemon=True)

    @property
    def addresses(self) -> dict[str, str]:
        if self.broker is not None:
            return self.broker.addresses
        assert self.server is not None
        return self.server.addresses

    @property
    def client_addr(self) -> str:
        return self.addresses["clients"]

    @property
    def stats_addr(self) -> str:
        return self.addresses["stats"]

    def _run_broker(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def on_ready(server: BrokerServer) -> None:
                self.server = server
                self._ready.set()

            await serve_broker(self.cfg, on_ready=on_ready, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the starting thread by start()
            self._error = exc
            self._ready.set()

    def start(self) -> LocalEngine:
        if self.broker is not None:
            try:
                self.broker.start(self.start_timeout_s)
            except BrokerExited as exc:
                raise EngineStartError(str(exc)) from None
        else:
            self._thread.start()
            self._ready.wait(self.start_timeout_s)
            if self._error is not None or self.server is None:
                raise EngineStartError(f"the broker did not start: {self._error}")
        for _ in range(self.num_workers):
            self.add_worker()
        self.wait_for_workers(self.num_workers)
        return self

    def add_worker(self, extra_args: Sequence[str] = ()) -> subprocess.Popen:
        argv = ["worker", "--connect", self.addresses["workers"], *self.worker_args, *extra_args]
        proc = spawn(argv)
        self.procs.append(proc)
        return proc

    def wait_for_workers(self, num_workers: int, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while self.num_workers_joined() < num_workers:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                self.stop()
                raise EngineStartError(
                    f"a worker exited with code {dead[0].returncode} before joining"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EngineStartError(f"{num_workers} workers did not join within the time limit")
            time.sleep(0.05)

    def num_workers_joined(self) -> int:
        """Workers the broker has now (0 while a supervised broker does not answer)."""
        if self.broker is None:
            assert self.server is not None
            return len(self.server.core.workers)
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
            sock.linger = 0
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(self.addresses["clients"].replace("0.0.0.0", "127.0.0.1"))
            sock.send(p.encode(p.GetStats()))
            if not sock.poll(1000):
                return 0
            reply = p.decode_client_reply(sock.recv())
            return reply.num_workers if isinstance(reply, p.StatsSnapshot) else 0

    def stop(self, drain_s: float | None = None) -> None:
        """Stop the broker first (it tells its workers to shut down), then reap the workers.
        ``drain_s`` (supervised): let it finish accepted requests for at most that long."""
        if self.broker is not None:
            self.broker.stop(drain_s)
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # the loop closed between the check and the call
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)
        stop_all(self.procs)

    def __enter__(self) -> LocalEngine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
