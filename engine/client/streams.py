"""AsyncStream: the tokens of one streaming request as an async iterator, its result after."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.client.types import GenerateResult, TokenDelta
from engine.protocol import Delta, Finished

if TYPE_CHECKING:
    from engine.client.async_client import AsyncClient
    from engine.client.inflight import Inflight


class AsyncStream:
    """Yields TokenDelta in order; ``result`` is the GenerateResult once the stream ended.

    The request is submitted on ``async with`` or on the first iteration. Closing the stream
    (leaving ``async with``, ``aclose()``, or dropping it) before its end cancels the request
    on the engine; ``result`` then stays None.
    """

    def __init__(
        self, client: AsyncClient, request_id: str, frame: bytes, timeout_s: float | None
    ) -> None:
        self.request_id = request_id
        self.result: GenerateResult | None = None
        self._client = client
        self._frame = frame
        self._timeout_s = timeout_s
        self._inflight: Inflight | None = None
        self._texts: list[str] = []
        self._token_ids: list[int] = []
        self._closed = False

    @property
    def prompt_tokens(self) -> int | None:
        """Prompt length in tokens, as the broker counted it (known once accepted)."""
        return None if self._inflight is None else self._inflight.prompt_tokens

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._texts)

    @property
    def token_ids(self) -> list[int]:
        """The token ids received so far."""
        return list(self._token_ids)

    async def start(self) -> None:
        """Submit the request and wait until the broker accepted it (done at most once)."""
        if self._inflight is None:
            if self._closed:
                raise RuntimeError(f"stream {self.request_id!r} was closed before it started")
            self._inflight = await self._client._start(
                self.request_id, self._frame, self._timeout_s
            )

    @property
    def closed(self) -> bool:
        """True once the stream ended or was closed: iterating it yields nothing more."""
        return self._closed

    async def aclose(self) -> None:
        """Stop listening; cancels the request on the engine if it has not finished."""
        self._closed = True
        if self._inflight is not None:
            self._client._abandon(self._inflight)

    def close_nowait(self) -> None:
        """aclose() from any thread, without waiting: the Cancel is sent soon by the loop."""
        self._closed = True
        if self._inflight is not None:
            self._client._abandon_threadsafe(self._inflight)

    async def __aenter__(self) -> AsyncStream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        assert self._inflight is not None
        try:
            while True:
                msg = await self._client._next(self._inflight)
                if isinstance(msg, Delta):
                    self._texts.append(msg.text)
                    self._token_ids.extend(msg.token_ids)
                    return TokenDelta(msg.text, list(msg.token_ids))
                if isinstance(msg, Finished):
                    self.result = GenerateResult.from_finished(msg)
                    self._closed = True
                    raise StopAsyncIteration
        except StopAsyncIteration:
            raise
        except BaseException:
            await self.aclose()
            raise

    def __del__(self) -> None:
        # Broken out of `async for` without `async with`: still free the request on the engine.
        if self._inflight is not None and not self._inflight.done:
            self.close_nowait()
