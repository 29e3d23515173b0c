"""The broker's ZeroMQ shell: sockets, the event loop, the clock. All decisions are in core.

Besides moving frames it keeps the links alive (docs/PROTOCOL.md, sections 8 and 11): Pings to
workers, lost and hung worker detection, closed connections (socket monitors), replies held for
slow clients (outbox.py), CURVE (curve.py), and the drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import zmq
import zmq.asyncio

from engine import links
from engine import protocol as p
from engine.broker.core import BrokerCore, ToClient, ToWorker
from engine.broker.outbox import ClientOutbox
from engine.broker.peers import MONITOR_EVENTS, PeerTracker
from engine.broker.recovery import Recovery
from engine.broker.stats import snapshot
from engine.broker.validation import check_prompt_fields, peek_request_id
from engine.config import BrokerConfig
from engine.curve import Authenticator
from engine.errors import SubmitError
from engine.tokenizer import TextCodec

log = logging.getLogger(__name__)

TICK_S = 0.005  # how often the policy is asked when requests wait (adaptive interval inside it)
CHARS_PER_TOKEN = 16  # a text prompt longer than this times the context is refused untokenized
_RESET_EVERY_S = 1.0  # a stranger sending heartbeats is told to reset at most this often


class BrokerStartError(RuntimeError):
    """The broker cannot start (an address taken or unusable); the message says what to change."""


def bind_failure(addr: str, domain: str, why: str) -> BrokerStartError:
    return BrokerStartError(
        f"cannot listen for {domain} on {addr}: {why}: pass another --port (0: any free "
        "ports), or stop the process that holds it"
    )


class BrokerServer:
    """Binds the client ROUTER, the worker ROUTER and the stats PUB, and runs the core."""

    def __init__(self, cfg: BrokerConfig, core: BrokerCore, codec: TextCodec) -> None:
        self.cfg = cfg
        self.core = core
        self.codec = codec
        self.ctx = zmq.asyncio.Context()
        self.auth = Authenticator(self.ctx, cfg.curve_dir) if cfg.curve_dir else None
        if self.auth is not None:
            self.auth.start()
        try:
            self._bind_all(cfg)
        except BaseException:
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
            raise
        curve = self.auth is not None
        self.client_peers = PeerTracker("clients", curve)
        self.worker_peers = PeerTracker("workers", curve)
        self.client_monitor = self.clients.get_monitor_socket(MONITOR_EVENTS)
        self.worker_monitor = self.workers.get_monitor_socket(MONITOR_EVENTS)
        # Sync views of the same sockets: every send is non-blocking (outbox.py holds the rest).
        self.outbox = ClientOutbox(zmq.Socket.shadow(self.clients.underlying))
        self._to_workers = zmq.Socket.shadow(self.workers.underlying)
        self._reset_sent: dict[bytes, float] = {}
        self.num_bad_frames = 0
        self._snapshot_cache: tuple[float, p.StatsSnapshot] | None = None
        self.rejected_by_code: collections.Counter[str] = collections.Counter()
        self.started_at = time.monotonic()
        self.draining_since: float | None = None
        self.ready = asyncio.Event()
        self.recovery: Recovery | None = None  # requests taken back from the journal

    def _bind_all(self, cfg: BrokerConfig) -> None:
        max_frame = p.MAX_CLIENT_FRAME_BYTES
        self.clients = self._socket(zmq.ROUTER, cfg.client_addr, "clients", lambda s: links.client_router(s, max_frame))  # fmt: skip
        self.workers = self._socket(zmq.ROUTER, cfg.worker_addr, "workers", links.worker_router)
        self.stats = self._socket(zmq.PUB, cfg.stats_addr, "stats", lambda s: s.setsockopt(zmq.SNDHWM, 16))  # fmt: skip

    def _socket(self, kind: int, addr: str, domain: str, tune) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        tune(sock)
        if self.auth is not None:
            self.auth.serve_on(sock, domain)
        try:
            sock.bind(addr)
        except zmq.ZMQError as exc:
            raise bind_failure(addr, domain, exc.strerror) from None
        return sock

    @property
    def addresses(self) -> dict[str, str]:
        """Bound endpoints (ports resolved when bound to port 0 / '*')."""
        return {
            "clients": self.clients.getsockopt_string(zmq.LAST_ENDPOINT),
            "workers": self.workers.getsockopt_string(zmq.LAST_ENDPOINT),
            "stats": self.stats.getsockopt_string(zmq.LAST_ENDPOINT),
        }

    async def run(self, stop: asyncio.Event, drain: asyncio.Event | None = None) -> None:
        """Serve until ``stop``; once ``drain`` is set, accept nothing new and stop when every
        accepted request has ended or drain_timeout_s has passed."""
        drain = drain or asyncio.Event()
        poller = zmq.asyncio.Poller()
        for sock in (self.worker_monitor, self.client_monitor, self.workers, self.clients):
            poller.register(sock, zmq.POLLIN)
        next_stats_at = next_ping_at = time.monotonic()
        self.ready.set()
        try:
            while not stop.is_set():
                busy = self.core.waiting or self.outbox.num_waiting
                events = dict(await poller.poll(TICK_S * 1000 if busy else 50))
                now = time.monotonic()
                await self._read(events, now)
                self._check_workers(now)
                self.core.expire(now)
                if drain.is_set() and self._drained(now):
                    break
                if now >= next_ping_at:
                    self._ping_workers()
                    next_ping_at = now + self.cfg.heartbeat_interval_s
                self.core.schedule(now)
                self._flush()
                if now >= next_stats_at:
                    await self.stats.send(p.encode(self._snapshot(now)))
                    next_stats_at = now + self.cfg.stats_interval_s
        finally:
            self._stop(time.monotonic())

    async def _read(self, events: dict, now: float) -> None:
        """Connection closes first: a new connection may reuse a closed one's descriptor."""
        if self.worker_monitor in events:
            await self._read_monitor(
                self.worker_monitor, self.worker_peers, self._on_worker_gone, now
            )
        if self.client_monitor in events:
            await self._read_monitor(
                self.client_monitor, self.client_peers, self._on_client_gone, now
            )
        if self.workers in events:
            await self._drain(self.workers, self.worker_peers, self._on_worker_frame, now)
        if self.clients in events:
            await self._drain(self.clients, self.client_peers, self._on_client_frame, now)

    async def _drain(
        self, sock, peers: PeerTracker, handler, now: float, max_frames: int = 1000
    ) -> None:
        monitor = self.client_monitor if sock is self.clients else self.worker_monitor
        on_gone = self._on_client_gone if sock is self.clients else self._on_worker_gone
        for _ in range(max_frames):
            try:
                frames = await sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._bad_frame("dropped a message of %d frames (send exactly 1)", len(frames) - 1)
                continue
            routing_id = frames[0].bytes
            if peers.needs_bind(routing_id):  # see PeerTracker: closes reported before reuse
                await self._read_monitor(monitor, peers, on_gone, now)
                peers.bind(routing_id, frames[1].get(zmq.SRCFD))
            try:
                handler(routing_id, frames[1], now)
            except Exception:  # a bug: never let one frame take the broker down
                log.exception("failed to handle a frame from %r", routing_id)

    async def _read_monitor(self, monitor, peers: PeerTracker, on_gone, now: float) -> None:
        while True:
            try:
                frames = await monitor.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            gone = peers.on_event(frames)
            if gone is not None:
                on_gone(gone, now)

    def _bad_frame(self, message: str, *args: object) -> None:
        """Log the first bad frames, then one in a thousand (a flood must not flood the log)."""
        self.num_bad_frames += 1
        if self.num_bad_frames <= 10 or self.num_bad_frames % 1000 == 0:
            log.warning(message + " [%d bad frames so far]", *args, self.num_bad_frames)

    # -- clients ---------------------------------------------------------------------------

    def _on_client_frame(self, client_id: bytes, frame: zmq.Frame, now: float) -> None:
        data = frame.bytes
        try:
            msg = p.decode_client_request(data)
        except p.ProtocolError as exc:
            self._reply_error(client_id, exc.code, exc.message, peek_request_id(data))
            return
        if isinstance(msg, p.Submit):
            try:
                check_prompt_fields(msg, self.codec.max_context_len * CHARS_PER_TOKEN)
                prompt_ids = self.codec.encode_prompt(msg)
            except SubmitError as exc:
                self._reply_error(client_id, exc.code, exc.message, msg.request_id)
                return
            self.core.submit(client_id, msg, prompt_ids, now, owner=self._owner(frame))
        elif isinstance(msg, p.Cancel):
            self.core.cancel(client_id, msg.request_id, now)
        elif isinstance(msg, p.GetStats):
            reply = self._snapshot(now)
            self.core.outbox.append(ToClient(client_id, reply, droppable=True))  # type: ignore[arg-type]

    def _owner(self, frame: zmq.Frame) -> bytes:
        """The client's CURVE key (the authenticator's User-Id); b"" without CURVE."""
        if self.auth is None:
            return b""
        return frame.get("User-Id").encode()

    def _reply_error(
        self, client_id: bytes, code: str, message: str, request_id: str | None
    ) -> None:
        error = p.Error(code=code, message=message, request_id=request_id)
        self.core.outbox.append(ToClient(client_id, error, droppable=True))

    def _on_client_gone(self, client_id: bytes, now: float) -> None:
        self.outbox.forget(client_id)
        self.core.client_gone(client_id, now)

    # -- workers ---------------------------------------------------------------------------

    def _on_worker_frame(self, identity: bytes, frame: zmq.Frame, now: float) -> None:
        try:
            msg = p.decode_from_worker(frame.bytes)
        except p.ProtocolError as exc:
            self._bad_frame("dropped an undecodable worker frame: %s", exc.message)
            return
        if isinstance(msg, p.Ready):
            self._on_ready(identity, msg, now)
            return
        worker = self.core.worker_by_identity(identity)
        if worker is None:  # one we forgot (lost, hung) or that reconnected: it must reset
            if isinstance(msg, p.Heartbeat):
                self._reset_stranger(identity, msg.session, now)
            return
        worker.last_seen_at = now
        self.core.on_worker_message(worker, msg, now)
        if isinstance(msg, p.Draining):  # every RunBatch it will get was sent before this Ping
            self._send_worker(identity, p.Ping(draining=True))

    def _on_ready(self, identity: bytes, msg: p.Ready, now: float) -> None:
        if msg.version != p.PROTOCOL_VERSION:
            log.error(
                "worker %s speaks protocol %d, this broker %d: upgrade one of them",
                msg.worker_id, msg.version, p.PROTOCOL_VERSION,
            )  # fmt: skip
            return
        self.core.add_worker(identity, msg, now)
        if self.recovery is not None:  # the first worker: nothing recovered has run yet
            self.recovery.worker_joined(self.core, msg.eos_token_ids, now)
            self.recovery = None
        self._send_worker(identity, p.Ping())  # it hears from the broker at once

    def _reset_stranger(self, identity: bytes, session: int, now: float) -> None:
        if now - self._reset_sent.get(identity, -_RESET_EVERY_S) < _RESET_EVERY_S:
            return
        if len(self._reset_sent) > 1024:
            self._reset_sent.clear()
        self._reset_sent[identity] = now
        reason = "this broker does not know this connection (declared lost, or reconnected)"
        self._send_worker(identity, p.Reset(session=session, reason=reason))

    def _on_worker_gone(self, identity: bytes, now: float) -> None:
        worker = self.core.worker_by_identity(identity)
        if worker is not None:
            self.core.remove_worker(worker.worker_id, now, reason="its connection closed")

    def _check_workers(self, now: float) -> None:
        for worker in list(self.core.workers.values()):
            why = worker.lost_reason(now, self.cfg.worker_timeout_s, self.cfg.hang_factor)
            if why is not None:
                self.core.remove_worker(worker.worker_id, now, reason=why, reset=True)

    def _ping_workers(self) -> None:
        for worker in list(self.core.workers.values()):
            self._send_worker(worker.identity, p.Ping(draining=worker.draining))

    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self._to_workers.send_multipart([identity, p.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: it left; its close event follows
            log.info("could not send %s to a worker connection: %s", type(msg).__name__, exc)

    # -- output, drain, stop ---------------------------------------------------------------

    def _flush(self) -> None:
        """Journal first: no reply leaves before what it tells is durable (broker/journal.py)."""
        refused = self.core.journal.commit()
        if refused:
            self.core.refuse_unjournaled(refused)
        self.outbox.flush()
        outbox, self.core.outbox = self.core.outbox, []
        for item in outbox:
            if isinstance(item, ToWorker):
                self._send_worker(item.identity, item.msg)
            else:
                if item.droppable and isinstance(item.msg, p.Error):  # a frame refused
                    self.rejected_by_code[item.msg.code] += 1
                self.outbox.send(item.client_id, item.msg, item.droppable)

    def _snapshot(self, now: float) -> p.StatsSnapshot:
        """One snapshot per tick however many GetStats came in it (a flood costs one)."""
        if self._snapshot_cache is None or self._snapshot_cache[0] != now:
            snap = snapshot(
                self.core, now, self.started_at, self._engine_info(), self.rejected_by_code
            )
            self._snapshot_cache = (now, snap)
        return self._snapshot_cache[1]

    def _engine_info(self) -> p.EngineInfo:
        """What a client may learn through GetStats (context and vocabulary: see snapshot)."""
        limits = self.core.limits
        return p.EngineInfo(
            model=self.cfg.model,
            max_context_len=limits.max_context_len,
            vocab_size=limits.vocab_size,
            max_gen_len=limits.max_gen_len,
            max_client_frame_bytes=p.MAX_CLIENT_FRAME_BYTES,
            max_queued_requests=self.cfg.max_queued_requests,
            max_queued_tokens=self.cfg.max_queued_tokens,
            stats_addr=self.addresses["stats"],
        )

    def _drained(self, now: float) -> bool:
        """Draining: True once every accepted request ended, or at the drain deadline."""
        if self.draining_since is None:
            self.draining_since, self.core.draining = now, True
            log.info(
                "draining: accepting no new request; finishing %d within %.0f s",
                len(self.core.requests), self.cfg.drain_timeout_s,
            )  # fmt: skip
        if not self.core.requests:
            log.info("drained: every accepted request has ended")
            return True
        if now - self.draining_since >= self.cfg.drain_timeout_s:
            num_left = len(self.core.requests)
            log.warning(
                "drain deadline passed with %d request%s unfinished",
                num_left, "" if num_left == 1 else "s",
            )  # fmt: skip
            return True
        return False

    def _stop(self, now: float) -> None:
        """Answer every live request, tell workers to stop, close everything."""
        try:
            if self.core.requests:
                message = "the broker stopped before this request finished: submit it again elsewhere or later"
                self.core.stop_all("shutting_down", message, now)
            self._flush()
            for worker in self.core.workers.values():
                self._send_worker(worker.identity, p.Shutdown())
            self.clients.setsockopt(zmq.LINGER, 500)  # let the last replies out
            self.workers.setsockopt(zmq.LINGER, 500)
        finally:
            self.core.journal.close()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy()
