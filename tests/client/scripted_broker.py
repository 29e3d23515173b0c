"""A scripted broker for the client tests: a ROUTER in a thread that speaks docs/PROTOCOL.md.

Each test gives it a handler ``(broker, client_id, msg)`` that answers one decoded client
message; every message it receives (or the ProtocolError of a frame it could not decode) is
also put on ``broker.received`` so that the test can wait for it without sleeping.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

import zmq

from engine import protocol as p

Handler = Callable[["ScriptedBroker", bytes, object], None]
WAIT_S = 5.0  # the longest any test waits for one message


class ScriptedBroker:
    def __init__(self, handler: Handler) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self.received: queue.Queue[object] = queue.Queue()
        self.handler = handler
        self.state: dict = {}  # scratch space for handlers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-broker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.sock.closed:
            if not self.sock.poll(20):  # wakes up to notice stop(); not a synchronisation
                continue
            client_id, frame = self.sock.recv_multipart()
            try:
                msg: object = p.decode_client_request(frame)
            except p.ProtocolError as exc:
                msg = exc
            self.received.put(msg)
            self.handler(self, client_id, msg)
        self.sock.close(linger=0)

    def send(self, client_id: bytes, msg) -> None:
        self.send_raw(client_id, p.encode(msg))

    def send_raw(self, client_id: bytes, frame: bytes) -> None:
        self.sock.send_multipart([client_id, frame])

    def close_socket(self) -> None:
        """From a handler: vanish, as a broker that crashed."""
        self.sock.close(linger=0)

    def expect(self, kind: type, timeout_s: float = WAIT_S):
        """The next received message, which must be a ``kind``."""
        msg = self.received.get(timeout=timeout_s)
        assert isinstance(msg, kind), f"expected {kind.__name__}, got {msg!r}"
        return msg

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT_S)
        assert not self._thread.is_alive(), "the scripted broker did not stop"
        self.ctx.term()


# -- scripted behaviours ---------------------------------------------------------------------


def prompt_tokens(msg: p.Submit) -> list[int]:
    """The fake tokenizer: one token per character (ids given as they are)."""
    if msg.prompt_ids is not None:
        return list(msg.prompt_ids)
    text = msg.prompt if msg.prompt is not None else "".join(m.content for m in msg.messages or [])
    return [ord(c) for c in text]


def finished(msg: p.Submit, tokens: list[int], reason: str, num_slices: int = 1) -> p.Finished:
    return p.Finished(
        request_id=msg.request_id or "broker-1",
        finish_reason=reason,
        text="".join(chr(t) for t in tokens),
        token_ids=tokens,
        usage=p.Usage(prompt_tokens=len(prompt_tokens(msg)), completion_tokens=len(tokens)),
        timings=p.Timings(queued_s=0.001, first_token_s=0.002, finished_s=0.003),
        num_slices=num_slices,
    )


def completion(msg: p.Submit) -> list[int]:
    """The fake model: echoes the prompt's tokens, upper-cased, up to max_tokens."""
    return [ord(chr(t).upper()) if t < 0x110000 else t for t in prompt_tokens(msg)][
        : msg.max_tokens
    ]


def deltas(msg: p.Submit, tokens: list[int], per_delta: int = 2) -> list[p.Delta]:
    chunks = [tokens[i : i + per_delta] for i in range(0, len(tokens), per_delta)]
    return [
        p.Delta(request_id=msg.request_id, text="".join(map(chr, c)), token_ids=c) for c in chunks
    ]


def echo(broker: ScriptedBroker, client_id: bytes, msg) -> None:
    """A well-behaved broker: accepts, streams in chunks of two tokens, finishes."""
    if isinstance(msg, p.Submit):
        broker.send(
            client_id, p.Accepted(request_id=msg.request_id, prompt_tokens=len(prompt_tokens(msg)))
        )
        tokens = completion(msg)
        if msg.stream:
            for d in deltas(msg, tokens):
                broker.send(client_id, d)
        reason = "length" if len(tokens) == msg.max_tokens else "stop"
        broker.send(client_id, finished(msg, tokens, reason))
    elif isinstance(msg, p.GetStats):
        broker.send(client_id, snapshot())
    elif isinstance(msg, p.Cancel):
        broker.send(
            client_id,
            p.Error(code="unknown_request", message="finished already", request_id=msg.request_id),
        )
    else:
        broker.send(client_id, p.Error(code=msg.code, message=msg.message))


def hold(broker: ScriptedBroker, client_id: bytes, msg) -> None:
    """Accepts and sends two deltas, then holds the request until it is cancelled."""
    if isinstance(msg, p.Submit):
        broker.send(client_id, p.Accepted(request_id=msg.request_id, prompt_tokens=1))
        tokens = completion(msg)[:4]
        if msg.stream:
            for d in deltas(msg, tokens):
                broker.send(client_id, d)
        broker.state[msg.request_id] = (msg, tokens)
    elif isinstance(msg, p.Cancel) and msg.request_id in broker.state:
        submit, tokens = broker.state.pop(msg.request_id)
        broker.send(client_id, finished(submit, tokens, "cancelled"))


def snapshot(**overrides) -> p.StatsSnapshot:
    fields = dict(
        uptime_s=1.5, policy="scls", slice_len=64, max_gen_len=1024, kv_mode="keep",
        num_workers=1, num_waiting=2, num_running=3, num_finished=4, num_failed=0,
        request_throughput=1.0, token_throughput=50.0, ttft_p50_s=0.1, ttft_p99_s=0.2,
        e2e_p50_s=1.0, e2e_p99_s=2.0, workers=[], requests=[], events=[], batches=[],
    )  # fmt: skip
    fields.update(overrides)
    return p.StatsSnapshot(**fields)


def run(coro, timeout_s: float = 20.0):
    """Run a coroutine on a fresh event loop, bounded so that a bug fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def free_tcp_addr() -> str:
    """A loopback address that nothing listens on (bound, then released)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close()
    ctx.term()
    return f"tcp://127.0.0.1:{port}"
