"""The broker's ZeroMQ shell: sockets, the event loop, the clock. All decisions are in core."""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack
import zmq
import zmq.asyncio

from engine import protocol as p
from engine.broker.core import BrokerCore, ToClient, ToWorker
from engine.broker.stats import snapshot
from engine.broker.validation import SubmitError, check_prompt_fields
from engine.config import BrokerConfig
from engine.tokenizer import TextCodec

log = logging.getLogger(__name__)

TICK_S = 0.005  # how often the policy is asked when requests wait (adaptive interval inside it)


class BrokerServer:
    """Binds the client ROUTER, the worker ROUTER and the stats PUB, and runs the core."""

    def __init__(self, cfg: BrokerConfig, core: BrokerCore, codec: TextCodec) -> None:
        self.cfg = cfg
        self.core = core
        self.codec = codec
        self.ctx = zmq.asyncio.Context()
        self.clients = self._socket(zmq.ROUTER, cfg.client_addr)
        self.clients.setsockopt(zmq.MAXMSGSIZE, p.MAX_CLIENT_FRAME_BYTES)
        self.workers = self._socket(zmq.ROUTER, cfg.worker_addr)
        self.stats = self._socket(zmq.PUB, cfg.stats_addr)
        self.started_at = time.monotonic()
        self.ready = asyncio.Event()

    def _socket(self, kind: int, addr: str) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(addr)
        return sock

    @property
    def addresses(self) -> dict[str, str]:
        """Bound endpoints (ports resolved when bound to port 0 / '*')."""
        return {
            "clients": self.clients.getsockopt_string(zmq.LAST_ENDPOINT),
            "workers": self.workers.getsockopt_string(zmq.LAST_ENDPOINT),
            "stats": self.stats.getsockopt_string(zmq.LAST_ENDPOINT),
        }

    async def run(self, stop: asyncio.Event) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.clients, zmq.POLLIN)
        poller.register(self.workers, zmq.POLLIN)
        next_stats_at = time.monotonic()
        self.ready.set()
        try:
            while not stop.is_set():
                timeout_ms = TICK_S * 1000 if self.core.waiting else 50
                events = dict(await poller.poll(timeout_ms))
                now = time.monotonic()
                if self.workers in events:
                    await self._drain(self.workers, self._on_worker_frame, now)
                if self.clients in events:
                    await self._drain(self.clients, self._on_client_frame, now)
                self._check_workers(now)
                self.core.schedule(now)
                await self._flush()
                if now >= next_stats_at:
                    await self.stats.send(p.encode(snapshot(self.core, now, self.started_at)))
                    next_stats_at = now + self.cfg.stats_interval_s
        finally:
            await self._shutdown_workers()
            self.ctx.destroy(linger=0)

    async def _drain(
        self, sock: zmq.asyncio.Socket, handler, now: float, max_frames: int = 1000
    ) -> None:
        for _ in range(max_frames):
            try:
                frames = await sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning(
                    "dropped a message of %d frames (expected 1 payload frame)", len(frames) - 1
                )
                continue
            handler(frames[0], frames[1], now)

    # -- clients ---------------------------------------------------------------------------

    def _on_client_frame(self, client_id: bytes, frame: bytes, now: float) -> None:
        try:
            msg = p.decode_client_request(frame)
        except p.ProtocolError as exc:
            self._reply_error(client_id, exc.code, exc.message, _peek_request_id(frame))
            return
        if isinstance(msg, p.Submit):
            try:
                check_prompt_fields(msg)
                prompt_ids = self.codec.encode_prompt(msg)
            except SubmitError as exc:
                self._reply_error(client_id, exc.code, exc.message, msg.request_id)
                return
            self.core.submit(client_id, msg, prompt_ids, now)
        elif isinstance(msg, p.Cancel):
            self.core.cancel(client_id, msg.request_id, now)
        elif isinstance(msg, p.GetStats):
            reply = snapshot(self.core, now, self.started_at)
            self.core.outbox.append(ToClient(client_id, reply))  # type: ignore[arg-type]

    def _reply_error(
        self, client_id: bytes, code: str, message: str, request_id: str | None
    ) -> None:
        self.core.outbox.append(
            ToClient(client_id, p.Error(code=code, message=message, request_id=request_id))
        )

    # -- workers ---------------------------------------------------------------------------

    def _on_worker_frame(self, identity: bytes, frame: bytes, now: float) -> None:
        try:
            msg = p.decode_from_worker(frame)
        except p.ProtocolError as exc:
            log.error("dropped an undecodable worker frame: %s", exc.message)
            return
        if isinstance(msg, p.Ready):
            if msg.version != p.PROTOCOL_VERSION:
                log.error(
                    "worker %s speaks protocol %d, this broker %d: upgrade one of them",
                    msg.worker_id,
                    msg.version,
                    p.PROTOCOL_VERSION,
                )
                return
            self.core.add_worker(identity, msg, now)
            return
        worker = self.core.worker_by_identity(identity)
        if worker is None:
            return  # a worker we declared lost: it must send Ready again to rejoin
        worker.last_seen_at = now
        if isinstance(msg, p.Generated):
            self.core.on_generated(worker, msg, now)
        elif isinstance(msg, p.Released):
            self.core.on_released(worker, msg, now)
        elif isinstance(msg, p.BatchDone):
            self.core.on_batch_done(worker, msg, now)
        elif isinstance(msg, p.Heartbeat):
            self.core.on_heartbeat(worker, msg, now)
        elif isinstance(msg, p.KVEvicted):
            self.core.on_kv_evicted(worker, msg.request_ids)
        elif isinstance(msg, p.WorkerFailed):
            self.core.on_worker_failed(worker, msg, now)

    def _check_workers(self, now: float) -> None:
        for worker in list(self.core.workers.values()):
            if now - worker.last_seen_at > self.cfg.worker_timeout_s:
                self.core.remove_worker(
                    worker.worker_id, now, reason=f"silent for {self.cfg.worker_timeout_s:.1f} s"
                )

    async def _flush(self) -> None:
        outbox, self.core.outbox = self.core.outbox, []
        for item in outbox:
            if isinstance(item, ToWorker):
                await self.workers.send_multipart([item.identity, p.encode(item.msg)])
            else:
                await self.clients.send_multipart([item.client_id, p.encode(item.msg)])

    async def _shutdown_workers(self) -> None:
        for worker in self.core.workers.values():
            try:
                await self.workers.send_multipart(
                    [worker.identity, p.encode(p.Shutdown())], flags=zmq.NOBLOCK
                )
            except zmq.ZMQError as exc:
                log.warning("could not tell worker %s to shut down: %s", worker.worker_id, exc)


def _peek_request_id(frame: bytes) -> str | None:
    """Best effort: the request id of a frame that failed validation, so the client can match it."""
    try:
        obj = msgpack.unpackb(frame, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None  # not decodable at all: the error reply carries no request id
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else None
