"""ZeroMQ options of the engine's links: TCP keepalive and ZMTP heartbeats between hosts, and the
size and queue limits that bound what one peer can make the broker hold."""

from __future__ import annotations

import zmq

# TCP keepalive: probe an idle connection after 10 s, every 2 s, give up after 3 misses. The
# kernel answers probes, so a slow (not reading) peer is never taken for a dead one.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
# ZMTP heartbeats on broker <-> worker links: a worker host that vanished without closing its
# connection is cut off after 3 s, like a worker whose heartbeats stopped.
WORKER_HEARTBEAT_IVL_MS = 1000
WORKER_HEARTBEAT_TIMEOUT_MS = 3000
# Frames a client connection may have queued in the broker before libzmq stops reading it
# (TCP back-pressure): with MAX_CLIENT_FRAME_BYTES it bounds one connection's memory.
CLIENT_RCVHWM = 32
# Replies queued to one client before the broker keeps them itself (see broker/outbox.py).
CLIENT_SNDHWM = 256
MAX_WORKER_FRAME_BYTES = 64 * 1024 * 1024
# A client (DEALER or SUB) whose broker went away retries after 0.1 s, then doubles the wait
# up to 2 s: a restarted broker is found within 2 s of binding, and nobody hammers a dead port.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000


def keepalive(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_COUNT)


def reconnect_backoff(sock: zmq.Socket) -> None:
    """A client's connecting socket: libzmq reconnects by itself, with exponential backoff."""
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)


def worker_link(sock: zmq.Socket) -> None:
    """Either end of a broker <-> worker link (before bind or connect)."""
    keepalive(sock)
    sock.setsockopt(zmq.HEARTBEAT_IVL, WORKER_HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, WORKER_HEARTBEAT_TIMEOUT_MS)


def client_router(sock: zmq.Socket, max_frame_bytes: int) -> None:
    """The broker's client ROUTER. No ZMTP heartbeat from this side: a client that does not read
    would not answer PINGs queued behind its replies, and a slow client must not be cut off;
    TCP keepalive finds vanished hosts instead."""
    keepalive(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
    sock.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue or a gone peer raises, not drops


def worker_router(sock: zmq.Socket) -> None:
    worker_link(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_FRAME_BYTES)
    sock.setsockopt(zmq.SNDHWM, 0)  # commands are never dropped; heartbeats cut a dead peer
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
