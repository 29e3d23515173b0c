"""Worker-to-worker KV handoffs over ZeroMQ, on a thread of their own so that compute never waits
on the network: a ROUTER (address announced in Ready.peer_addr) serves this worker's parked KV
to peers; a DEALER per peer pulls the KV of dispatched requests and hands each arrival, checked,
to the compute thread (or says that it failed: the request is then recomputed).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq

from engine import protocol as p
from engine.worker import kv_wire as w
from engine.worker.kv_reuse import KVArrived, KVFetchFailed
from engine.worker.kv_store import KVStore

log = logging.getLogger(__name__)

DEFAULT_PEER_BIND = "tcp://127.0.0.1:*"
BASE_TIMEOUT_S = 1.0  # a fetch fails after this plus four times its expected transfer time
PROBE_BYTES = 16 << 20


@dataclass(slots=True)
class _Fetch:
    request_id: str
    peer: str
    token_ids: list[int]
    started_at: float
    deadline: float


class _FetchCmd(msgspec.Struct, array_like=True, gc=False):
    request_id: str
    peer: str
    token_ids: list[int]


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """Measured at start: loopback transfer through this worker's own peer socket, and the
    host copy a KV offload or restore does."""

    transfer_bytes_per_s: float
    transfer_latency_s: float


class HandoffThread(threading.Thread):
    """Serves the store that ``store_of()`` returns (the current executor's: a reset replaces
    it) to peers and pulls KV for this worker; ``deliver`` (thread-safe, e.g. a queue's put)
    receives a KVArrived or KVFetchFailed per fetch, exactly once."""

    def __init__(
        self,
        ctx: zmq.Context,
        store_of: Callable[[], KVStore],
        shape: w.KVShape,
        deliver: Callable[[KVArrived | KVFetchFailed], None],
        bind: str = DEFAULT_PEER_BIND,
        base_timeout_s: float = BASE_TIMEOUT_S,
    ) -> None:
        super().__init__(name="handoff", daemon=True)
        self.ctx, self.store_of, self.shape, self.deliver = ctx, store_of, shape, deliver
        self.base_timeout_s = base_timeout_s
        self.transfer_bytes_per_s = 1e9  # refined by probe() and by real transfers
        self.server = self._socket(zmq.ROUTER)
        self.server.setsockopt(zmq.MAXMSGSIZE, w.MAX_REQUEST_FRAME_BYTES)
        self.server.bind(bind)
        self.peer_addr = _advertised(self.server.getsockopt_string(zmq.LAST_ENDPOINT))
        cmd_addr = f"inproc://handoff-{id(self)}"
        self._cmd_in = self._socket(zmq.PAIR)
        self._cmd_in.bind(cmd_addr)
        self._cmd_out = self._socket(zmq.PAIR)  # used by the caller's thread only
        self._cmd_out.connect(cmd_addr)
        self._peers: dict[str, zmq.Socket] = {}
        self._fetches: dict[int, _Fetch] = {}
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self.bytes_served = 0  # handed off to peers since start

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    # -- the caller's side (the worker's I/O thread) ---------------------------------------------

    def fetch_for(self, run: p.RunBatch) -> None:
        """Start pulling the KV of every item of ``run`` that names a peer (``kv_source``)."""
        for item in run.items:
            if item.kv_source:
                cmd = _FetchCmd(item.request_id, item.kv_source, item.token_ids[:-1])
                self._cmd_out.send(msgspec.msgpack.encode(cmd))

    def stop(self) -> None:
        self._stopping.set()

    # -- the thread ------------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server, zmq.POLLIN)
        poller.register(self._cmd_in, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                for sock, _ in poller.poll(timeout=20):
                    if sock is self.server:
                        self._serve()
                    elif sock is self._cmd_in:
                        self._start_fetch(self._cmd_in.recv(), poller)
                    else:
                        self._on_reply(sock.recv_multipart(copy=False))
                self._expire(time.perf_counter())
        except zmq.ZMQError as exc:  # the context was terminated under us: the worker stops
            log.debug("handoff thread stops: %s", exc)
        finally:
            for fetch in self._fetches.values():
                self.deliver(KVFetchFailed(fetch.request_id, "the worker is stopping"))
            for sock in (self.server, self._cmd_in, self._cmd_out, *self._peers.values()):
                sock.close(linger=0)

    def _serve(self) -> None:
        identity, *frames = self.server.recv_multipart()
        try:
            if len(frames) != 1:
                raise w.KVWireError(f"a fetch request has 1 frame, got {len(frames)}")
            req = w.decode_request(frames[0])
        except w.KVWireError as exc:
            log.warning("dropped a malformed handoff request: %s", exc)
            return
        if isinstance(req, w.Probe):
            body = bytes(min(req.num_bytes, PROBE_BYTES))
            reply = [w.encode_status(req.fetch_id, "", "probe"), body]
        else:
            entry = self.store_of().take_layers(
                req.request_id
            )  # moved: it now belongs to the receiver
            if entry is None:
                message = f"no KV of {req.request_id} here (evicted, or never parked)"
                reply = [w.encode_status(req.fetch_id, req.request_id, "missing", message)]
            else:
                reply = w.encode_kv(req.fetch_id, req.request_id, entry.token_ids, entry.layers)
                self.bytes_served += entry.nbytes
        self.server.send_multipart([identity, *reply], copy=False)

    def _start_fetch(self, frame: bytes, poller: zmq.Poller) -> None:
        cmd = msgspec.msgpack.decode(frame, type=_FetchCmd)
        now = time.perf_counter()
        nbytes = len(cmd.token_ids) * 2 * self.shape.num_layers * self.shape.num_kv_heads
        nbytes *= self.shape.head_dim * self.shape.dtype.itemsize
        timeout_s = self.base_timeout_s + 4 * nbytes / self.transfer_bytes_per_s
        fetch_id = next(self._ids)
        self._fetches[fetch_id] = _Fetch(
            cmd.request_id, cmd.peer, cmd.token_ids, now, now + timeout_s
        )
        sock = self._peers.get(cmd.peer)
        if sock is None:
            sock = self._peers[cmd.peer] = self._socket(zmq.DEALER)
            sock.setsockopt(zmq.MAXMSGSIZE, self.shape.max_bytes + (1 << 20))
            try:
                sock.connect(cmd.peer)
            except zmq.ZMQError as exc:
                self._fail(fetch_id, f"cannot connect to {cmd.peer}: {exc}")
                return
            poller.register(sock, zmq.POLLIN)
        request = w.FetchKV(w.WIRE_VERSION, fetch_id, cmd.request_id, len(cmd.token_ids))
        try:
            sock.send(w.encode_request(request), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._fail(fetch_id, f"the connection to {cmd.peer} is full")

    def _on_reply(self, frames: list) -> None:
        try:
            header = w.decode_header(frames[0].buffer)
        except w.KVWireError as exc:
            log.warning("dropped a handoff reply: %s", exc)
            return  # no fetch id to match: the fetch runs into its deadline
        fetch = self._fetches.pop(header.fetch_id, None)
        if fetch is None or header.request_id != fetch.request_id:
            if fetch is not None:
                self._fetches[header.fetch_id] = fetch
            log.debug("dropped a late or unknown handoff reply (fetch %d)", header.fetch_id)
            return
        try:
            layers, nbytes = w.decode_kv(
                header, [f.buffer for f in frames[1:]], self.shape, fetch.token_ids
            )
        except w.KVWireError as exc:
            self.deliver(KVFetchFailed(fetch.request_id, f"from {fetch.peer}: {exc}"))
            return
        elapsed_s = time.perf_counter() - fetch.started_at
        if nbytes >= 1 << 20:  # large enough to measure bandwidth rather than latency
            rate = nbytes / max(elapsed_s, 1e-6)
            self.transfer_bytes_per_s = 0.8 * self.transfer_bytes_per_s + 0.2 * rate
        arrived = KVArrived(
            fetch.request_id, tuple(fetch.token_ids), layers, nbytes, elapsed_s, fetch.peer
        )
        self.deliver(arrived)

    def _fail(self, fetch_id: int, reason: str) -> None:
        fetch = self._fetches.pop(fetch_id, None)
        if fetch is not None:
            self.deliver(KVFetchFailed(fetch.request_id, reason))

    def _expire(self, now: float) -> None:
        for fetch_id in [i for i, f in self._fetches.items() if f.deadline <= now]:
            peer = self._fetches[fetch_id].peer
            self._fail(fetch_id, f"no answer from {peer} in time (peer gone or overloaded)")

    # -- start-up measurement ----------------------------------------------------------------------

    def probe(self, num_bytes: int = PROBE_BYTES, repeats: int = 3) -> Bandwidth:
        """Time round trips through this worker's own ROUTER (before the thread starts): an
        empty one for the latency, ``num_bytes`` ones for the bandwidth."""
        dealer = self._socket(zmq.DEALER)
        dealer.connect(self.peer_addr)
        try:
            latency_s = min(self._round_trip(dealer, 0) for _ in range(repeats))
            full_s = min(self._round_trip(dealer, num_bytes) for _ in range(repeats))
        finally:
            dealer.close(linger=0)
        bandwidth = num_bytes / max(full_s - latency_s, 1e-6)
        self.transfer_bytes_per_s = bandwidth
        return Bandwidth(bandwidth, latency_s)

    def _round_trip(self, dealer: zmq.Socket, num_bytes: int) -> float:
        started_at = time.perf_counter()
        dealer.send(w.encode_request(w.Probe(w.WIRE_VERSION, 0, num_bytes)))
        if not self.server.poll(5000):
            raise TimeoutError(f"the peer socket {self.peer_addr} did not answer its own probe")
        self._serve()
        if not dealer.poll(5000):
            raise TimeoutError(f"no probe reply through {self.peer_addr}")
        dealer.recv_multipart()
        return time.perf_counter() - started_at


def _advertised(endpoint: str) -> str:
    """The address peers can connect to: a wildcard bind is announced with this host's name."""
    for wildcard in ("0.0.0.0", "*", "[::]"):
        if f"//{wildcard}:" in endpoint:
            import socket

            return endpoint.replace(wildcard, socket.getfqdn(), 1)
    return endpoint


def measure_copy_bytes_per_s(device, num_bytes: int = 32 << 20, pin: bool = False) -> float:
    """Bytes per second of a device-to-host copy and back (an offload then a restore, halved);
    on a CPU a memory copy, which is what the host tier costs there."""
    import torch

    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(3):
        started_at = time.perf_counter()
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin).copy_(src)
        back = host.to(device, copy=True)
        if back.device.type == "cuda":
            torch.cuda.synchronize(back.device)
        best = min(best, time.perf_counter() - started_at)
    return 2 * num_bytes / max(best, 1e-9)
