"""Any OpenAI-compatible server (this engine's gateway, vLLM, SGLang, Ollama...) as a benchmark
entry: the same load as the engine entries, sent as streamed ``POST /v1/completions`` requests
and stamped like the ZeroMQ load generator (loadgen.drive), so that metrics and reports are the
same. Before the load, a few probe requests find what the server accepts.

Prompts are the workload's token ids (made with the tokenizer of ``--model``), sent as the
completions API's ``prompt`` array of token ids, so that the server sees exactly the
benchmark's prompt: no re-tokenisation, no BOS added. A server that refuses token ids (a 4xx
to the probe) gets the ids decoded to text instead; its own count may then differ by a token or
a few. Output lengths are forced with ``ignore_eos`` (vLLM's, SGLang's and this engine's extra)
and ``min_tokens`` (vLLM's, SGLang's), whichever the server accepts, and ``max_tokens``; a
server that ignores both may stop early, which ``num_length_mismatches`` counts.

An OpenAI stream chunk carries text, not a token count: each chunk with text counts as one
token when it arrives (TTFT, ITL and stalls are per chunk, as vLLM's benchmark does), and the
stream's final usage (``stream_options.include_usage``) corrects the total, the difference put
on the last chunk. A server that sends no usage is counted by its chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from engine.bench.loadgen import Driven, LoadItem, drive
from engine.bench.progress import Progress, StallWatch
from engine.bench.records import RequestRecord

log = logging.getLogger(__name__)

#: What a request sends to force its output length, most thorough first; the probe keeps the
#: first that the server accepts (a server that refuses unknown fields, as this engine's
#: gateway does, refuses the pair).
LENGTH_CONTROLS: tuple[tuple[str, ...], ...] = (
    ("ignore_eos", "min_tokens"),
    ("ignore_eos",),
    ("min_tokens",),
    (),
)
PROBE_MAX_TOKENS = 2
PROBE_PROMPT_LEN = 8
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


class EndpointError(ValueError):
    """An endpoint that cannot be benchmarked; the message says what to check or pass."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server under test. ``url``: its OpenAI base URL (``http://HOST:PORT/v1``);
    ``model``: the name sent in each request (None until resolved); ``prompt``: "token_ids"
    or "text"; ``length_control``: the fields sent to force the output length; ``usage``:
    whether the server answers ``stream_options.include_usage``."""

    name: str
    url: str
    model: str | None = None
    prompt: str = "token_ids"
    length_control: tuple[str, ...] = LENGTH_CONTROLS[0]
    usage: bool = True

    def body(self, prompt: list[int] | str, output_len: int) -> dict[str, Any]:
        """A streamed, greedy completion of exactly ``output_len`` tokens (if the server
        honours the length control)."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": output_len,
            "temperature": 0.0,
            "stream": True,
        }
        if self.usage:
            body["stream_options"] = {"include_usage": True}
        if "ignore_eos" in self.length_control:
            body["ignore_eos"] = True
        if "min_tokens" in self.length_control:
            body["min_tokens"] = output_len
        return body

    def describe(self) -> str:
        control = " + ".join(self.length_control) or "nothing (the server may stop early)"
        return (
            f"{self.name}: {self.url}, model {self.model!r}, prompts as "
            f"{self.prompt.replace('_', ' ')}, lengths forced with {control}, "
            f"{'usage from the stream' if self.usage else 'tokens counted by chunks'}"
        )


def parse_endpoints(specs: Sequence[str]) -> tuple[Endpoint, ...]:
    """``--endpoint [NAME=]URL`` values; unnamed ones are "endpoint" (several: "endpoint-1",
    "endpoint-2", ...)."""
    out = []
    for i, spec in enumerate(specs):
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = (f"endpoint-{i + 1}" if len(specs) > 1 else "endpoint"), spec
        name, url = name.strip().lower(), url.strip().rstrip("/")
        if not _NAME.fullmatch(name):
            raise EndpointError(
                f"--endpoint {spec!r}: name the entry with letters, digits and ._- (NAME=URL)"
            )
        if not url.startswith(("http://", "https://")):
            raise EndpointError(
                f"--endpoint {spec!r}: give the server's OpenAI base URL, e.g. "
                "http://127.0.0.1:8000/v1"
            )
        out.append(Endpoint(name, url))
    return tuple(out)


def read_api_key(path: Path | None) -> str | None:
    """The first line of ``path`` that is neither blank nor a ``#`` comment."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EndpointError(f"--endpoint-api-key-file: cannot read {path}: {exc}") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise EndpointError(f"--endpoint-api-key-file: {path} holds no key")


def _client(api_key: str | None, timeout: httpx.Timeout) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # No connection limit: a request that waited for a free connection in the client would
    # count the wait in its TTFT (vLLM's benchmark does the same).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits)


def error_message(text: str) -> str:
    """The message of an OpenAI error object (or FastAPI's ``detail``), else the body's start."""
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return " ".join(text.split())[:200] or "no body"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for value in (err, data.get("detail"), data.get("message")):
            if value:
                return str(value)[:300]
    return text[:200]


async def sse_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent-event stream, up to ``data: [DONE]``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            data = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            raise EndpointError(
                f"the stream sent an event that is not JSON: {payload[:80]!r}"
            ) from None
        if isinstance(data, dict):
            yield data


def _unreachable(ep: Endpoint, exc: httpx.HTTPError) -> EndpointError:
    return EndpointError(
        f"{ep.name}: cannot reach {ep.url} ({exc or type(exc).__name__}): is the server "
        "running there? (--endpoint takes its OpenAI base URL, e.g. http://127.0.0.1:8000/v1)"
    )


def _refused(ep: Endpoint, what: str, status: int, message: str) -> EndpointError:
    if status in (401, 403):
        hint = "pass its key with --endpoint-api-key-file FILE"
    elif status == 404:
        hint = f"check that the URL ends in /v1 and that GET {ep.url}/models lists the model"
    else:
        hint = "is the server ready?"
    return EndpointError(f"{ep.name}: {what} answered {status} ({message}): {hint}")


async def _served_model(client: httpx.AsyncClient, ep: Endpoint) -> str:
    resp = await client.get(f"{ep.url}/models")
    if resp.status_code != 200:
        raise _refused(ep, f"GET {ep.url}/models", resp.status_code, error_message(resp.text))
    try:
        models = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(
            f"{ep.name}: GET {ep.url}/models is not an OpenAI model list: pass --endpoint-model"
        ) from None
    if len(models) != 1:
        raise EndpointError(
            f"{ep.name}: the server lists {len(models)} models ({', '.join(models) or 'none'}): "
            "pick one with --endpoint-model NAME"
        )
    return models[0]


async def _probe(
    client: httpx.AsyncClient, ep: Endpoint, prompt: list[int] | str
) -> tuple[int, str, bool]:
    """(status, message, whether a usage chunk came) of one short streamed request."""
    body = msgspec.json.encode(ep.body(prompt, PROBE_MAX_TOKENS))
    headers = {"Content-Type": "application/json"}
    async with client.stream("POST", f"{ep.url}/completions", content=body, headers=headers) as r:
        if r.status_code != 200:
            return r.status_code, error_message((await r.aread()).decode(errors="replace")), False
        saw_usage = False
        async for data in sse_events(r):
            if data.get("error"):
                raise EndpointError(
                    f"{ep.name}: the server failed a probe request: {error_message(msgspec.json.encode(data).decode())}"
                )
            saw_usage = saw_usage or bool(data.get("usage"))
        return 200, "", saw_usage


async def resolve(
    ep: Endpoint,
    model: str | None,
    api_key: str | None,
    probe_ids: list[int],
    decode: Callable[[list[int]], str],
) -> Endpoint:
    """``ep`` with its model (``model``, or the only one the server lists) and the first
    request shape the server accepts: token ids before text, then the length controls in
    LENGTH_CONTROLS order (at most 8 short requests, which warm the server up too)."""
    refusals: list[str] = []
    async with _client(api_key, httpx.Timeout(60.0, connect=10.0)) as client:
        try:
            ep = dataclasses.replace(ep, model=model or await _served_model(client, ep))
            for prompt_kind in ("token_ids", "text"):
                prompt = probe_ids if prompt_kind == "token_ids" else decode(probe_ids)
                for control in LENGTH_CONTROLS:
                    candidate = dataclasses.replace(ep, prompt=prompt_kind, length_control=control)
                    status, message, saw_usage = await _probe(client, candidate, prompt)
                    if status == 200:
                        return dataclasses.replace(candidate, usage=saw_usage)
                    if status not in (400, 422):
                        raise _refused(ep, f"POST {ep.url}/completions", status, message)
                    refusals.append(message)
        except httpx.HTTPError as exc:
            raise _unreachable(ep, exc) from None
    raise EndpointError(
        f"{ep.name}: the server refused every request shape the benchmark can send; the "
        f"first refusal: {refusals[0]}"
    )


def resolve_all(
    endpoints: Sequence[Endpoint],
    model: str | None,
    api_key: str | None,
    items: Sequence[LoadItem],
    decode: Callable[[list[int]], str],
) -> tuple[Endpoint, ...]:
    probe_ids = list(items[0].prompt_ids[:PROBE_PROMPT_LEN])

    async def all_of() -> list[Endpoint]:
        return [await resolve(ep, model, api_key, probe_ids, decode) for ep in endpoints]

    resolved = tuple(asyncio.run(all_of()))
    for ep in resolved:
        log.info("endpoint %s", ep.describe())
    return resolved


def recount(item: LoadItem, rec: RequestRecord, completion_tokens: int) -> None:
    """Make the record's token count the server's (its usage): chunks counted one token each
    until now; the difference goes on (or comes off) the last chunks."""
    counted = min(completion_tokens, item.output_len)
    diff = counted - rec.num_output_tokens
    if diff > 0 and rec.chunk_tokens:
        rec.chunk_tokens[-1] += diff
        rec.num_output_tokens += diff
    elif diff > 0:
        rec.add_chunk(rec.finished_s or 0.0, diff)
    while diff < 0 and rec.chunk_tokens:
        take = min(-diff, rec.chunk_tokens[-1])
        rec.chunk_tokens[-1] -= take
        rec.num_output_tokens -= take
        diff += take
        if rec.chunk_tokens[-1] == 0:
            rec.chunk_tokens.pop()
            rec.chunk_times_s.pop()
    if not rec.chunk_times_s:
        rec.first_token_s = None
    rec.excess_tokens = completion_tokens - counted


async def _send(
    client: httpx.AsyncClient,
    ep: Endpoint,
    tag: str,
    prompts: dict[int, list[int] | str],
    item: LoadItem,
    rec: RequestRecord,
    t0: float,
    watch: StallWatch,
) -> None:
    rec.request_id = f"{tag}-{item.index}"
    body = msgspec.json.encode(ep.body(prompts[item.index], item.output_len))
    headers = {"Content-Type": "application/json", "X-Request-Id": rec.request_id}
    rec.submitted_s = time.monotonic() - t0
    rec.finish_reason = "timeout"  # until it ends otherwise (a cancellation leaves it so)
    reason, usage_tokens = None, None
    try:
        async with client.stream("POST", f"{ep.url}/completions", content=body, headers=headers) as r:  # fmt: skip
            if r.status_code != 200:
                message = error_message((await r.aread()).decode(errors="replace"))
                return _fail(rec, t0, f"HTTP {r.status_code}: {message}")
            async for data in sse_events(r):
                at_s = time.monotonic() - t0
                if data.get("error"):
                    return _fail(rec, t0, error_message(msgspec.json.encode(data).decode()))
                for choice in data.get("choices") or ():
                    if choice.get("text"):
                        rec.take_tokens(at_s, 1)
                        watch.tokens(at_s)
                    reason = choice.get("finish_reason") or reason
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
    except (httpx.HTTPError, EndpointError) as exc:
        return _fail(rec, t0, f"{type(exc).__name__}: {exc}")
    rec.finished_s = time.monotonic() - t0
    if isinstance(usage_tokens, int):
        recount(item, rec, usage_tokens)
    if reason not in ("stop", "length"):
        rec.finish_reason, rec.error = "error", f"the stream ended with finish_reason {reason!r}"
        return
    rec.finish_reason = reason


def _fail(rec: RequestRecord, t0: float, message: str) -> None:
    rec.finish_reason, rec.error = "error", message
    rec.finished_s = time.monotonic() - t0


async def run_endpoint_load(
    ep: Endpoint,
    api_key: str | None,
    items: Sequence[LoadItem],
    prompt_texts: Sequence[str] | None,
    send_times: Sequence[float] | None,
    concurrency: int | None,
    max_duration_s: float,
    stall_timeout_s: float | None,
    tag: str,
    progress: Progress,
) -> Driven:
    """The whole load against one resolved endpoint (see loadgen.drive for the rules).
    ``prompt_texts``: the items' prompts decoded, for an endpoint that takes text."""
    if ep.prompt == "text":
        assert prompt_texts is not None, "an endpoint that takes text needs the decoded prompts"
        prompts: dict[int, list[int] | str] = {
            it.index: text for it, text in zip(items, prompt_texts, strict=True)
        }
    else:
        prompts = {it.index: list(it.prompt_ids) for it in items}
    async with _client(api_key, httpx.Timeout(None, connect=30.0)) as client:
        send = functools.partial(_send, client, ep, tag, prompts)
        return await drive(
            send, items, send_times, concurrency, time.monotonic(), max_duration_s,
            stall_timeout_s, progress,
        )  # fmt: skip
