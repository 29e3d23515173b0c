"""POST /v1/completions and /v1/chat/completions: parse, submit through the client library,
answer whole or as server-sent events; a client that leaves cancels its request."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.client import AsyncStream, EngineError, GenerateResult
from engine.http import schema
from engine.http.auth import KEY_SCOPE_STATE
from engine.http.body import read_body
from engine.http.errors import APIError, bad_request, from_engine
from engine.http.gateway import Gateway
from engine.http.responses import DONE, Shape, engine_extra, finish_reason, sse
from engine.http.streaming import ClientGone, EventStream, until_disconnect

log = logging.getLogger(__name__)

#: OpenAI's default max_tokens for /v1/completions (a chat's default is "what fits").
COMPLETION_DEFAULT_MAX_TOKENS = 16
#: How long the engine may take to confirm the cancellation of a request whose client left
#: (its token counts come with the confirmation), in seconds.
CANCEL_WAIT_S = 2.0
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
    if "prompt_ids" in prompt:
        gw.check_token_ids(prompt["prompt_ids"], "prompt")
    max_tokens = schema.requested_max_tokens(req)
    if max_tokens is None:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    return await _generate(request, gw, False, req, prompt, max_tokens)


@_counting_refusals
async def chat_completions(request: Request, gw: Gateway) -> Response:
    req = schema.decode_body(await _body(request, gw), schema.ChatCompletionRequest)
    messages = schema.chat_messages(req.messages)
    max_tokens = schema.requested_max_tokens(req)
    defaulted = max_tokens is None
    if max_tokens is None:
        prompt_len = len(await asyncio.to_thread(gw.tokenize, messages=messages))
        max_tokens = gw.default_max_tokens(prompt_len)
    prompt = {"messages": messages}
    return await _generate(request, gw, True, req, prompt, max_tokens, defaulted)


async def _body(request: Request, gw: Gateway) -> bytes:
    return await read_body(request, gw.cfg.max_body_bytes, gw.cfg.body_timeout_s)


def _request_ids(request: Request) -> tuple[str, str]:
    """(the caller's id, the engine's): the client's X-Request-Id (an empty one counts as
    none) or a fresh uuid. With API keys, the engine's id is the caller's prefixed with its
    key's scope: the engine resumes and replays requests by id (docs/HTTP.md), and callers with
    different keys must never reach each other's requests."""
    given = request.headers.get("x-request-id") or None
    if given is None:
        given = uuid.uuid4().hex
    elif not _REQUEST_ID.fullmatch(given):
        raise bad_request("X-Request-Id must be 1 to 128 letters, digits or ._:- characters")
    scope = request.scope.get("state", {}).get(KEY_SCOPE_STATE)
    return given, given if scope is None else f"{scope}:{given}"


async def _generate(
    request: Request,
    gw: Gateway,
    chat: bool,
    req: schema.ChatCompletionRequest | schema.CompletionRequest,
    prompt: dict[str, Any],
    max_tokens: int,
    defaulted: bool = False,
) -> Response:
    """``defaulted``: the client sent no max_tokens (the gateway chose ``max_tokens``)."""
    gw.check_model(req.model)
    call = {**prompt, **schema.sampling_params(req), "max_tokens": max_tokens}
    wants_usage = schema.include_usage(req)
    gw.check_available()
    caller_id, engine_id = _request_ids(request)
    shape = Shape(chat, caller_id, gw.model_name, include_usage=wants_usage)
    headers = {"X-Request-Id": caller_id}
    try:
        if req.stream:
            stream = gw.client.stream(**call, request_id=engine_id)
            await stream.start()
            return _event_stream(gw, stream, shape, headers)
        task = asyncio.ensure_future(gw.client.generate(**call, request_id=engine_id))
        result = await until_disconnect(request.receive, task)
    except EngineError as exc:
        raise _refusal(gw, exc, max_tokens if defaulted else None) from None
    except ClientGone:
        await _stop(gw, task, engine_id)
        return Response(status_code=499)  # nobody reads it: the client has gone
    body = shape.body(result)  # raises a 500 if the engine failed the request midway
    gw.requests.finished(result)
    return JSONResponse(body, headers=headers)


def _refusal(gw: Gateway, exc: EngineError, defaulted_max_tokens: int | None) -> APIError:
    """The HTTP error of ``exc``; a prompt too long for the max_tokens the gateway chose says
    that the client sent none."""
    error = from_engine(exc, gw.cfg.request_timeout_s)
    if defaulted_max_tokens is None or error.code != "prompt_too_long":
        return error
    return APIError(
        error.status,
        error.code,
        f"{error.message} (no max_tokens was sent: the gateway asked for the "
        f"{defaulted_max_tokens:,} tokens that the model's context leaves after the prompt; "
        "send a smaller max_tokens, or shorter messages)",
        param="messages",
    )


async def _stop(gw: Gateway, task: asyncio.Future[GenerateResult], engine_id: str) -> None:
    """The client of a whole (non-streamed) request left: cancel it on the engine and count
    its tokens from the engine's answer (Finished, reason "cancelled"), as a stream's are."""
    try:
        await gw.client.cancel(engine_id)
        async with asyncio.timeout(CANCEL_WAIT_S):
            result = await task
    except (EngineError, TimeoutError):  # no answer in time: the tokens stay uncounted
        log.warning("request %r: no answer to its cancellation; its tokens are not counted",
                    engine_id)  # fmt: skip
        gw.requests.aborted(None, 0)
        return
    finally:
        if not task.done():
            task.cancel()
    if result.finish_reason == "cancelled":
        gw.requests.aborted(result.usage.prompt_tokens, result.usage.completion_tokens)
    else:  # it ended before the cancellation reached the engine
        gw.requests.finished(result)


def _event_stream(
    gw: Gateway, stream: AsyncStream, shape: Shape, headers: dict[str, str]
) -> EventStream:
    async def on_close(finished: bool) -> None:
        await stream.aclose()  # cancels the request on the engine unless it ended
        if stream.result is not None:
            gw.requests.finished(stream.result)
        elif not finished:
            gw.requests.aborted(stream.prompt_tokens, len(stream.token_ids))

    return EventStream(_events(gw, stream, shape), on_close, headers)


async def _events(gw: Gateway, stream: AsyncStream, shape: Shape) -> AsyncIterator[bytes]:
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
        if shape.include_usage:
            yield sse(shape.usage_chunk(result.usage))
    except (EngineError, APIError) as exc:  # after the 200: an event carries it, as in vLLM
        error = exc if isinstance(exc, APIError) else from_engine(exc, gw.cfg.request_timeout_s)
        gw.requests.refused(error.code)
        yield sse(error.body())
    yield DONE
