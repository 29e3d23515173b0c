"""Client: the blocking twin of AsyncClient, for plain scripts and threads.

It runs an AsyncClient on a private event loop in a daemon thread and waits for each call;
several threads may share one Client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, Unpack

from engine.client.async_client import AsyncClient
from engine.client.connection import DEFAULT_ADDR
from engine.client.errors import ClientClosed
from engine.client.streams import AsyncStream
from engine.client.types import ChatInput, GenerateResult, SamplingArgs, TokenDelta
from engine.curve import ClientKeys
from engine.protocol import StatsSnapshot

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP_TIMEOUT_S = 5.0


class _LoopThread:
    """An event loop running in a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="engine-client", daemon=True
        )
        self._thread.start()
        self.stopped = False

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.stopped:
            coro.close()
            raise ClientClosed()
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError("a blocking Client method was called from the client's own thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt and the like: stop the request on the engine too
            raise

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it, join the thread and close the loop."""
        if self.stopped:
            return
        self.stopped = True
        if self.on_loop_thread():  # from a finalizer on this very thread: cannot wait here
            self.loop.call_soon(self.loop.stop)
            return
        future = asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self.loop)
        try:
            future.result(timeout=_STOP_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, asyncio.CancelledError):
            log.warning("client tasks did not stop within %s s", _STOP_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=_STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("the client's event loop thread did not stop within %s s", _STOP_TIMEOUT_S)
        else:
            self.loop.close()


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


async def _make_client(addr: str, curve: ClientKeys | None, **timeouts: Any) -> AsyncClient:
    return AsyncClient(addr, curve=curve, **timeouts)


def _shutdown(runner: _LoopThread, aclient: AsyncClient) -> None:
    """Close the client and its thread (Client.close, or the finalizer of a dropped Client)."""
    if runner.stopped:
        return
    if not runner.on_loop_thread():
        try:
            runner.call(aclient.close())
        except Exception:
            log.exception("closing the client failed")
    runner.stop()


class Stream:
    """Blocking twin of AsyncStream: an iterator of TokenDelta; ``result`` once it ended.

    ``for d in client.stream(...)``, ``next(stream)`` and ``with client.stream(...) as s`` all
    work. Closing the stream (``close()``, leaving ``with``, or dropping it, as a ``for`` loop
    that breaks early does) before its end cancels the request on the engine.
    """

    def __init__(self, runner: _LoopThread, stream: AsyncStream) -> None:
        self._runner = runner
        self._stream = stream
        self.request_id = stream.request_id

    @property
    def result(self) -> GenerateResult | None:
        """The GenerateResult once the stream ended; None before, or if it was closed early."""
        return self._stream.result

    @property
    def prompt_tokens(self) -> int | None:
        return self._stream.prompt_tokens

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._stream.text

    @property
    def token_ids(self) -> list[int]:
        """The token ids received so far."""
        return self._stream.token_ids

    def __enter__(self) -> Stream:
        self._runner.call(self._stream.start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> TokenDelta:
        if self._stream.closed:
            raise StopIteration
        try:
            return self._runner.call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop listening; cancels the request on the engine if it has not finished. Does
        not wait: the Cancel leaves before anything this client sends afterwards."""
        if not self._runner.stopped:  # else the client closed and cancelled its requests
            self._stream.close_nowait()


class Client:
    """The blocking client: AsyncClient's API, with plain return values and iterators.

    ``timeout_s``: default limit on a whole request (None: no limit); ``connect_timeout_s``:
    how long to wait for the broker's first answer before raising Disconnected;
    ``resume_timeout_s``: how long requests in flight wait for a broker that went away, to
    continue where they were (see AsyncClient; None: fail at once).
    """

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        *,
        timeout_s: float | None = None,
        connect_timeout_s: float = 5.0,
        resume_timeout_s: float | None = 30.0,
        curve: ClientKeys | None = None,
    ) -> None:
        self.addr = addr
        runner = _LoopThread()
        try:
            aclient = runner.call(
                _make_client(
                    addr,
                    curve,
                    timeout_s=timeout_s,
                    connect_timeout_s=connect_timeout_s,
                    resume_timeout_s=resume_timeout_s,
                )  # fmt: skip
            )
        except BaseException:
            runner.stop()
            raise
        self._runner = runner
        self._aclient = aclient
        self._finalizer = weakref.finalize(self, _shutdown, runner, aclient)

    def generate(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: Sequence[int] | None = None,
        messages: ChatInput | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingArgs],
    ) -> GenerateResult:
        """See AsyncClient.generate."""
        return self._runner.call(
            self._aclient.generate(
                prompt, prompt_ids=prompt_ids, messages=messages, request_id=request_id,
                timeout_s=timeout_s, **sampling,
            )
        )  # fmt: skip

    def stream(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: Sequence[int] | None = None,
        messages: ChatInput | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingArgs],
    ) -> Stream:
        """See AsyncClient.stream: ``with client.stream(...) as s: for d in s: ...``."""
        if self._runner.stopped:
            raise ClientClosed()
        return Stream(
            self._runner,
            self._aclient.stream(
                prompt, prompt_ids=prompt_ids, messages=messages, request_id=request_id,
                timeout_s=timeout_s, **sampling,
            ),
        )  # fmt: skip

    def chat(self, messages: ChatInput, **params: Any) -> GenerateResult:
        """See AsyncClient.chat."""
        return self.generate(messages=messages, **params)

    def cancel(self, request_id: str) -> None:
        """See AsyncClient.cancel."""
        self._runner.call(self._aclient.cancel(request_id))

    def stats(self, *, timeout_s: float | None = None) -> StatsSnapshot:
        """See AsyncClient.stats."""
        return self._runner.call(self._aclient.stats(timeout_s=timeout_s))

    def close(self) -> None:
        """Cancel this client's requests, close its socket and stop its thread. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
