"""AsyncClient: one DEALER socket to the broker and one reader task that routes every reply to
the request it answers (by ``request_id``), so that one client carries many concurrent requests."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Unpack

import zmq.asyncio

from engine.client.connection import DEFAULT_ADDR, Connection
from engine.client.errors import (
    ClientClosed,
    Disconnected,
    EngineError,
    InvalidRequest,
    RequestRejected,
    RequestTimeout,
)
from engine.client.inflight import Diverged, Inflight, check_timeout
from engine.client.streams import AsyncStream
from engine.client.types import ChatInput, GenerateResult, SamplingArgs, build_submit
from engine.curve import ClientKeys
from engine.protocol import (
    Accepted,
    Cancel,
    Delta,
    Error,
    Finished,
    GetStats,
    ProtocolError,
    StatsSnapshot,
    decode_client_reply,
    encode,
)

log = logging.getLogger(__name__)


class AsyncClient:
    """Talks to the broker's client socket (docs/PROTOCOL.md) from one asyncio event loop.

    ``timeout_s``: default limit on a whole request, from submission to its last token (None:
    no limit; each call may pass its own). ``connect_timeout_s``: how long a request may wait
    for the broker's first answer (Accepted) before the client raises Disconnected.
    ``resume_timeout_s``: when the connection to the broker drops (it died, restarted, or the
    network broke), how long requests in flight wait for it to come back; ZeroMQ reconnects
    with backoff, and the client then sends each of them again by id, so that it continues
    (docs/PROTOCOL.md, section 8): a stream goes on from its last token, without a duplicated
    or missing one. None: fail them with Disconnected at once.
    The client binds to the event loop it is first used on; use ``Client`` from threads.
    """

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        *,
        timeout_s: float | None = None,
        connect_timeout_s: float = 5.0,
        resume_timeout_s: float | None = 30.0,
        context: zmq.asyncio.Context | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        self.addr = addr
        self.timeout_s = check_timeout("timeout_s", timeout_s)
        self.connect_timeout_s = check_timeout(
            "connect_timeout_s", connect_timeout_s, none_ok=False
        )
        self.resume_timeout_s = (
            None
            if resume_timeout_s is None
            else check_timeout("resume_timeout_s", resume_timeout_s, none_ok=False)
        )
        self._conn = Connection(
            addr, send_timeout_s=self.connect_timeout_s, context=context, curve=curve
        )
        self.addr = self._conn.addr  # tcp://HOST:PORT, whichever form was given
        self._inflight: dict[str, Inflight] = {}
        self._stats_waiters: deque[asyncio.Future[StatsSnapshot]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._give_up: asyncio.TimerHandle | None = None  # ends the wait for a lost broker
        self._resubmitting: asyncio.Task[None] | None = None

    # -- public API ------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: Sequence[int] | None = None,
        messages: ChatInput | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingArgs],
    ) -> GenerateResult:
        """Generate from exactly one of ``prompt``, ``prompt_ids`` or ``messages`` and wait for
        the whole result. Raises RequestRejected, RequestTimeout, Disconnected or ValueError."""
        submit, frame = build_submit(
            prompt, prompt_ids=prompt_ids, messages=messages, request_id=request_id,
            stream=False, deadline_s=self._deadline_s(timeout_s), **sampling,
        )  # fmt: skip
        inflight = await self._start(submit.request_id, frame, timeout_s)
        try:
            while True:
                msg = await self._next(inflight)
                if isinstance(msg, Finished):
                    return GenerateResult.from_finished(msg)
        finally:
            self._abandon(inflight)

    def stream(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: Sequence[int] | None = None,
        messages: ChatInput | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingArgs],
    ) -> AsyncStream:
        """Like generate, but yields TokenDelta as tokens come; the request is submitted when
        the stream is entered or first iterated::

            async with client.stream("Once upon a time") as s:
                async for delta in s:
                    print(delta.text, end="")
            print(s.result.finish_reason)

        Leaving the stream before its end cancels the request on the engine.
        """
        submit, frame = build_submit(
            prompt, prompt_ids=prompt_ids, messages=messages, request_id=request_id,
            stream=True, deadline_s=self._deadline_s(timeout_s), **sampling,
        )  # fmt: skip
        if self._closed:
            raise ClientClosed()
        return AsyncStream(self, submit.request_id, frame, timeout_s)

    async def chat(self, messages: ChatInput, **params) -> GenerateResult:
        """generate(messages=messages, ...): messages are {"role", "content"} dicts or
        ChatMessage; the broker applies the model's chat template."""
        return await self.generate(messages=messages, **params)

    async def cancel(self, request_id: str) -> None:
        """Ask the engine to stop a request that this client submitted: its generate or stream
        then ends with finish_reason "cancelled". Returns once the Cancel is sent; an unknown
        id is answered by an Error that the client logs and drops."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        self._ensure_running()
        await self._conn.send(encode(Cancel(request_id=request_id)), request_id)

    async def stats(self, *, timeout_s: float | None = None) -> StatsSnapshot:
        """The broker's current StatsSnapshot; waits at most timeout_s (default:
        connect_timeout_s) and raises Disconnected when no snapshot came."""
        loop = self._ensure_running()
        wait_s = check_timeout("timeout_s", timeout_s) or self.connect_timeout_s
        waiter: asyncio.Future[StatsSnapshot] = loop.create_future()
        self._stats_waiters.append(waiter)
        try:
            await self._conn.send(encode(GetStats()))
            async with asyncio.timeout(wait_s):
                return await waiter
        except TimeoutError:
            raise Disconnected(
                self.addr,
                f"no stats snapshot from {self.addr} within {wait_s:g} s: is the broker "
                "running there? Start one with `python run.py serve`.",
            ) from None
        finally:
            if waiter in self._stats_waiters:
                self._stats_waiters.remove(waiter)

    async def close(self) -> None:
        """Cancel this client's requests on the engine (best effort), then close the socket.
        Requests still waiting raise ClientClosed. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._give_up is not None:
            self._give_up.cancel()
        if self._resubmitting is not None:
            self._resubmitting.cancel()
        for inflight in list(self._inflight.values()):
            self._conn.send_nowait(encode(Cancel(request_id=inflight.request_id)))
        self._fail_all(lambda _request_id: ClientClosed())
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._conn.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- request life cycle (also used by AsyncStream) --------------------------------------

    def _deadline_s(self, timeout_s: float | None) -> float | None:
        """The request's limit, sent as Submit.deadline_s: the broker then stops it on time even
        if this client's Cancel never arrives (docs/PROTOCOL.md, section 8)."""
        return check_timeout("timeout_s", timeout_s) or self.timeout_s

    async def _start(self, request_id: str, frame: bytes, timeout_s: float | None) -> Inflight:
        """Register and send a Submit; return once the broker has accepted it."""
        loop = self._ensure_running()
        if request_id in self._inflight:
            raise InvalidRequest(
                f"request_id {request_id!r} is already in flight on this client: pass another "
                "id, or none to get a fresh one",
                request_id,
                code="duplicate_request_id",
            )
        timeout = check_timeout("timeout_s", timeout_s) or self.timeout_s
        deadline = None if timeout is None else loop.time() + timeout
        inflight = Inflight(request_id, timeout, deadline, frame)
        self._inflight[request_id] = inflight
        try:
            await self._conn.send(frame, request_id)
            first = await self._next(inflight, accept_by=loop.time() + self.connect_timeout_s)
        except BaseException:
            self._abandon(inflight)
            raise
        if not isinstance(first, Accepted):  # tolerate a broker that skips Accepted
            inflight.unget(first)
        return inflight

    async def _next(
        self, inflight: Inflight, accept_by: float | None = None
    ) -> Accepted | Delta | Finished:
        """The request's next reply; raises the error that ended it, or on its deadline."""
        while True:
            deadline = inflight.deadline
            if accept_by is not None and (deadline is None or accept_by < deadline):
                deadline = accept_by
            try:
                async with asyncio.timeout_at(deadline):
                    item = await inflight.get()
                break
            except TimeoutError:
                assert self._loop is not None
                if inflight.deadline is not None and self._loop.time() >= inflight.deadline:
                    raise RequestTimeout(
                        inflight.request_id, inflight.timeout_s or 0.0, inflight.num_tokens
                    ) from None
                if not inflight.lost:
                    raise self._no_answer(inflight.request_id) from None
                accept_by = None  # the broker went away meanwhile: resume_timeout_s bounds it
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Error):
            if item.code == "deadline_exceeded":  # the broker enforced the same limit
                raise RequestTimeout(
                    inflight.request_id, inflight.timeout_s or 0.0, inflight.num_tokens
                )
            raise RequestRejected.from_error(item)
        return item

    def _abandon(self, inflight: Inflight) -> None:
        """Stop listening for a request; if it has not ended, cancel it on the engine."""
        if inflight.done:
            return
        inflight.done = True
        self._inflight.pop(inflight.request_id, None)
        if not self._closed:
            self._conn.send_nowait(encode(Cancel(request_id=inflight.request_id)))

    def _abandon_threadsafe(self, inflight: Inflight) -> None:
        """_abandon from any thread (an AsyncStream dropped without being closed); on the
        loop's own thread at once, so that the Cancel leaves before any later frame."""
        if self._loop is None or self._loop.is_closed() or inflight.done:
            return
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._abandon(inflight)
            return
        try:
            self._loop.call_soon_threadsafe(self._abandon, inflight)
        except RuntimeError:  # the loop closed meanwhile: the socket is gone with it
            pass

    # -- socket plumbing --------------------------------------------------------------------

    def _ensure_running(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise ClientClosed()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._reader = loop.create_task(self._read_loop(), name=f"client-reader {self.addr}")
        elif loop is not self._loop:
            raise RuntimeError(
                "an AsyncClient serves the event loop it was first used on: create one client "
                "per event loop, or use the blocking Client from several threads"
            )
        return loop

    async def _read_loop(self) -> None:
        try:
            await self._conn.read_forever(
                self._dispatch, self._on_connection_lost, self._on_connection_back
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the client's reader for %s failed", self.addr)
            error = EngineError(f"the client's reader failed: {exc!r}")
            self._fail_all(lambda _request_id: error)

    def _dispatch(self, frame: bytes) -> None:
        try:
            msg = decode_client_reply(frame)
        except ProtocolError as exc:
            log.error("dropped a reply from %s that does not decode: %s", self.addr, exc.message)
            return
        if isinstance(msg, StatsSnapshot):
            while self._stats_waiters:
                waiter = self._stats_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(msg)
                    return
            return
        if msg.request_id is None:
            self._on_unrouted_error(msg)
            return
        inflight = self._inflight.get(msg.request_id)
        if inflight is None:  # a request this client gave up on (its Cancel is on the way)
            log.debug("dropped a %s for request %r", type(msg).__name__, msg.request_id)
            return
        if isinstance(msg, Accepted):
            inflight.accepted = True
            inflight.prompt_tokens = msg.prompt_tokens
        elif isinstance(msg, Delta):
            try:
                new = inflight.received.take(msg)  # after a resubmission: drop the replay
            except Diverged:
                self._end(inflight, self._diverged(inflight.request_id))
                self._conn.send_nowait(encode(Cancel(request_id=inflight.request_id)))
                return
            if new is None:
                return
            msg = new
        elif isinstance(msg, Error) and msg.code == "duplicate_request_id" and inflight.resubmitted:
            # Its first Submit reached the new connection too (see _on_connection_back).
            inflight.resubmitted = False
            return
        else:  # Finished or Error: the last message of the request
            inflight.done = True
            self._inflight.pop(msg.request_id, None)
        inflight.put(msg)

    def _on_unrouted_error(self, error: Error) -> None:
        """An Error without request_id answers a frame the broker could not decode. The broker
        answers frames in order, so it is about the oldest request still waiting for Accepted."""
        waiting = [f for f in self._inflight.values() if not f.accepted]
        if not waiting:
            log.error("the broker at %s reported (%s): %s", self.addr, error.code, error.message)
            return
        inflight = waiting[0]
        inflight.done = True
        self._inflight.pop(inflight.request_id, None)
        inflight.put(RequestRejected(error.code, error.message, inflight.request_id))

    def _on_connection_lost(self) -> None:
        if self.resume_timeout_s is None:
            for inflight in list(self._inflight.values()):  # delivered if the broker comes back
                self._conn.send_nowait(encode(Cancel(request_id=inflight.request_id)))
            self._fail_all(self._lost)
            return
        self._fail_all(self._lost, list(self._stats_waiters), [])  # not resumed: ask again
        for inflight in self._inflight.values():
            inflight.lost = True
        if self._inflight:
            log.warning(
                "lost the connection to the broker at %s: %d request%s in flight continue%s "
                "when it is back (waiting up to %g s)", self.addr, len(self._inflight),
                "" if len(self._inflight) == 1 else "s", "s" if len(self._inflight) == 1 else "",
                self.resume_timeout_s,
            )  # fmt: skip
        assert self._loop is not None
        if self._give_up is None:
            self._give_up = self._loop.call_later(self.resume_timeout_s, self._give_up_resuming)

    def _on_connection_back(self) -> None:
        """A broker answers again: send every request that was in flight again, unchanged.
        The broker resumes it (the same broker, or one restarted on its journal) or runs it
        anew (a broker that knew nothing of it); either way its stream starts again from the
        first token, which Received.take checks against what arrived and drops. If the first
        Submit was still queued in the socket, it reaches the broker on this connection too,
        and the resubmission is then answered duplicate_request_id: expected, and ignored."""
        if self._give_up is not None:
            self._give_up.cancel()
            self._give_up = None
        lost = [f for f in self._inflight.values() if f.lost]
        for inflight in lost:
            inflight.lost, inflight.resubmitted = False, True
            inflight.received.replay()
        if lost:
            assert self._loop is not None
            self._resubmitting = self._loop.create_task(
                self._resubmit(lost), name=f"client-resubmit {self.addr}"
            )

    async def _resubmit(self, inflights: list[Inflight]) -> None:
        for inflight in inflights:
            if inflight.done:
                continue  # abandoned meanwhile
            try:
                await self._conn.send(inflight.frame, inflight.request_id)
            except Disconnected as exc:  # the send queue stayed full
                self._end(inflight, exc)
        log.warning(
            "the broker at %s answers again: resubmitted %d request%s",
            self.addr, len(inflights), "" if len(inflights) == 1 else "s",
        )  # fmt: skip

    def _give_up_resuming(self) -> None:
        self._give_up = None
        lost = [f for f in self._inflight.values() if f.lost]
        self._fail_all(self._lost, [], lost)

    def _lost(self, request_id: str | None) -> Disconnected:
        what = "a stats request" if request_id is None else f"request {request_id!r}"
        waited = "" if self.resume_timeout_s is None else (
            f" and it did not come back within resume_timeout_s={self.resume_timeout_s:g} s"
        )  # fmt: skip
        return Disconnected(
            self.addr,
            f"lost the connection to the broker at {self.addr} while {what} was in "
            f"flight{waited}; its reply is lost: send it again once the broker is back "
            "(`python run.py serve`)",
            request_id,
            reason="lost",
        )

    def _diverged(self, request_id: str) -> Disconnected:
        return Disconnected(
            self.addr,
            f"request {request_id!r} could not be resumed: the broker at {self.addr} came back "
            "without it and generated it again differently from what this client had received "
            "(a different model, or sampling whose seed was not sent): send it again",
            request_id,
            reason="diverged",
        )

    def _end(self, inflight: Inflight, error: BaseException) -> None:
        inflight.done = True
        self._inflight.pop(inflight.request_id, None)
        inflight.put(error)

    def _fail_all(
        self,
        make_error: Callable[[str | None], BaseException],
        stats_waiters: list[asyncio.Future[StatsSnapshot]] | None = None,
        inflights: list[Inflight] | None = None,
    ) -> None:
        """Fail ``inflights`` and ``stats_waiters`` (default: all of them)."""
        if inflights is None:
            inflights = list(self._inflight.values())  # a copy: a dropped stream may pop
        for inflight in inflights:
            self._end(inflight, make_error(inflight.request_id))
        waiters = list(self._stats_waiters) if stats_waiters is None else stats_waiters
        for waiter in waiters:
            self._stats_waiters.remove(waiter)
            if not waiter.done():
                waiter.set_exception(make_error(None))

    def _no_answer(self, request_id: str) -> Disconnected:
        reason = "no_answer" if self._conn.connected else "unreachable"
        if reason == "no_answer":
            message = (
                f"the peer at {self.addr} accepted the connection but did not answer request "
                f"{request_id!r} within connect_timeout_s={self.connect_timeout_s:g} s: is it "
                f"the broker's client address (default {DEFAULT_ADDR}), not its worker or stats "
                "address? If the broker is only busy, pass a larger connect_timeout_s."
            )
        else:
            message = (
                f"no broker answered at {self.addr} within connect_timeout_s="
                f"{self.connect_timeout_s:g} s (nothing accepted the connection): start one "
                "with `python run.py serve`, or pass the address it listens on."
            )
        return Disconnected(self.addr, message, request_id, reason=reason)
