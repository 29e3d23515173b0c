"""The gateway's ASGI app: its routes, OpenAI error objects for every refusal, the optional
bearer check, and the start and stop of its link to the engine. Wiring only: the routes'
work lives in openai_routes.py and the engine's in gateway.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.http import schema
from engine.http.auth import BearerAuth
from engine.http.body import read_body
from engine.http.errors import APIError, bad_request
from engine.http.gateway import Gateway
from engine.http.openai_routes import chat_completions, completions
from engine.http.streaming import ClientGone
from engine.protocol import PROTOCOL_VERSION

log = logging.getLogger(__name__)


def build_app(gateway: Gateway) -> Starlette:
    """The app around ``gateway``; with ``cfg.metrics_only`` just /metrics and /health."""
    routes = [Route("/metrics", metrics), Route("/health", health)]
    if not gateway.cfg.metrics_only:
        routes += [
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models),
            Route("/v1/models/{model:path}", get_model),
            Route("/version", get_version),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
        ]
    middleware = []
    if gateway.cfg.api_keys:
        middleware.append(Middleware(BearerAuth, keys=gateway.cfg.api_keys))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            APIError: _api_error,
            ClientGone: _client_gone,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    # No 307 to the path without its trailing slash: uvicorn would build the Location from the
    # client's Host header, and clients do not replay a POST body on redirects anyway.
    app.router.redirect_slashes = False
    app.state.gateway = gateway
    return app


# -- small endpoints ------------------------------------------------------------------------


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    return Response(generate_latest(gw.registry), media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> Response:
    """200 when a request can be served now (a worker is up, no drain); 503 says why not."""
    gw: Gateway = request.app.state.gateway
    error = gw.unavailable()
    if error is not None:
        return _api_error(request, error)
    snap = gw.stats
    assert snap is not None
    return JSONResponse({"status": "ok", "num_workers": snap.num_workers})


def _model_card(gw: Gateway) -> dict:
    return {
        "id": gw.model_name,
        "object": "model",
        "created": int(gw.started_at),
        "owned_by": "scls-engine",
        "root": gw.cfg.model,
        "parent": None,
        "max_model_len": gw.codec.max_context_len,
    }


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.gateway)]})


async def get_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    gw.check_model(request.path_params["model"])
    return JSONResponse(_model_card(gw))


async def get_version(request: Request) -> Response:
    try:
        engine_version = version("scls-engine")
    except PackageNotFoundError:
        engine_version = "unknown"
    return JSONResponse({"version": engine_version, "protocol_version": PROTOCOL_VERSION})


async def tokenize(request: Request) -> Response:
    """The prompt's token ids as the engine counts them (text, or a chat with its template)."""
    gw: Gateway = request.app.state.gateway
    body = await read_body(request, gw.cfg.max_body_bytes, gw.cfg.body_timeout_s)
    req = schema.decode_body(body, schema.TokenizeRequest)
    gw.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send exactly one of prompt or messages")
    messages = None if req.messages is None else schema.chat_messages(req.messages)
    ids = await asyncio.to_thread(gw.tokenize, prompt=req.prompt, messages=messages)
    return JSONResponse(
        {"count": len(ids), "max_model_len": gw.codec.max_context_len, "tokens": ids}
    )


async def detokenize(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    body = await read_body(request, gw.cfg.max_body_bytes, gw.cfg.body_timeout_s)
    req = schema.decode_body(body, schema.DetokenizeRequest)
    gw.check_model(req.model)
    text = await asyncio.to_thread(gw.detokenize, req.tokens)
    return JSONResponse({"prompt": text})


# -- errors as OpenAI error objects ----------------------------------------------------------


def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404:
        message += f" (routes here: {', '.join(_paths(request))})"
    error = APIError(exc.status_code, code, message)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


def _paths(request: Request) -> list[str]:
    """The paths this app serves ("/v1/models/{model}"): the API, or metrics only."""
    return [route.path.replace(":path}", "}") for route in request.app.routes]


def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    error = APIError(500, "internal", f"the gateway failed: {exc!r} (see its log)")
    return JSONResponse(error.body(), status_code=500)
