"""POST /v1/completions and /v1/chat/completions: parse, submit through the client library,
answer whole or as server-sent events; a client that leaves cancels its request."""

from __future__ import annotations

import asyncio
import functools
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.client import AsyncStream, EngineError
from engine.http import schema
from engine.http.body import read_body
from engine.http.errors import APIError, bad_request, from_engine
from engine.http.gateway import Gateway
from engine.http.responses import DONE, Shape, engine_extra, finish_reason, sse
from engine.http.streaming import ClientGone, EventStream, until_disconnect

#: OpenAI's default max_tokens for /v1/completions (a chat's default is "what fits").
COMPLETION_DEFAULT_MAX_TOKENS = 16
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _counting_refusals(handler: Callable[[Request, Gateway], Awaitable[Response]]):
    """A route that counts every refusal it answers in scls:requests_rejected_total."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        try:
            return await handler(request, gw)
        except APIError as exc:
            gw.requests.refused(exc.code)
            raise

    return route


@_counting_refusals
async def completions(request: Request, gw: Gateway) -> Response:
    req = schema.decode_body(await _body(request, gw), schema.CompletionRequest)
    prompt = schema.completion_prompt(req)
    max_tokens = schema.requested_max_tokens(req)
    if max_tokens is None:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    return await _generate(request, gw, False, req, prompt, max_tokens)


@_counting_refusals
async def chat_completions(request: Request, gw: Gateway) -> Response:
    req = schema.decode_body(await _body(request, gw), schema.ChatCompletionRequest)
    messages = schema.chat_messages(req.messages)
    max_tokens = schema.requested_max_tokens(req)
    if max_tokens is None:
        prompt_len = len(await asyncio.to_thread(gw.tokenize, messages=messages))
        max_tokens = gw.default_max_tokens(prompt_len)
    return await _generate(request, gw, True, req, {"messages": messages}, max_tokens)


async def _body(request: Request, gw: Gateway) -> bytes:
    return await read_body(request, gw.cfg.max_body_bytes, gw.cfg.body_timeout_s)


def _request_id(request: Request) -> str:
    """The client's X-Request-Id (the engine's request_id, shown by the dashboard), or a uuid."""
    given = request.headers.get("x-request-id")
    if given is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(given):
        raise bad_request("X-Request-Id must be 1 to 128 letters, digits or ._:- characters")
    return given


async def _generate(
    request: Request,
    gw: Gateway,
    chat: bool,
    req: schema.ChatCompletionRequest | schema.CompletionRequest,
    prompt: dict[str, Any],
    max_tokens: int,
) -> Response:
    gw.check_model(req.model)
    call = {**prompt, **schema.sampling_params(req), "max_tokens": max_tokens}
    wants_usage = schema.include_usage(req)
    gw.check_available()
    shape = Shape(chat, _request_id(request), gw.model_name)
    headers = {"X-Request-Id": shape.request_id}
    try:
        if req.stream:
            stream = gw.client.stream(**call, request_id=shape.request_id)
            await stream.start()
            return _event_stream(gw, stream, shape, wants_usage, headers)
        work = gw.client.generate(**call, request_id=shape.request_id)
        result = await until_disconnect(request.receive, work)
    except EngineError as exc:
        raise from_engine(exc) from None
    except ClientGone:
        gw.requests.aborted(None, 0)
        return Response(status_code=499)  # nobody reads it: the client has gone
    body = shape.body(result)  # raises a 500 if the engine failed the request midway
    gw.requests.finished(result)
    return JSONResponse(body, headers=headers)


def _event_stream(
    gw: Gateway, stream: AsyncStream, shape: Shape, wants_usage: bool, headers: dict[str, str]
) -> EventStream:
    async def on_close(finished: bool) -> None:
        await stream.aclose()  # cancels the request on the engine unless it ended
        if stream.result is not None:
            gw.requests.finished(stream.result)
        elif not finished:
            gw.requests.aborted(stream.prompt_tokens, len(stream.token_ids))

    return EventStream(_events(gw, stream, shape, wants_usage), on_close, headers)


async def _events(
    gw: Gateway, stream: AsyncStream, shape: Shape, wants_usage: bool
) -> AsyncIterator[bytes]:
    try:
        if shape.chat:  # OpenAI's first chunk names the role
            yield sse(shape.chunk("", role=True))
        async for delta in stream:
            if delta.text:
                yield sse(shape.chunk(delta.text))
        result = stream.result
        assert result is not None
        last = shape.chunk(None if shape.chat else "", finish_reason(result))
        yield sse(last | {"scls": engine_extra(result)})
        if wants_usage:
            yield sse(shape.usage_chunk(result.usage))
    except (EngineError, APIError) as exc:  # after the 200: an event carries it, as in vLLM
        error = exc if isinstance(exc, APIError) else from_engine(exc)
        gw.requests.refused(error.code)
        yield sse(error.body())
    yield DONE
