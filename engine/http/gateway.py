"""The gateway's one adapter to the engine: the client library's AsyncClient, the stats
stream, the model's tokenizer (no weights) and the metrics they feed. Routes ask it; nothing
else in engine/http talks to the broker."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry

from engine.client import AsyncClient, AsyncStatsSubscriber, StatsSnapshot
from engine.client.stats import find_stats_address
from engine.curve import ClientKeys
from engine.errors import SubmitError
from engine.http.config import GatewayConfig
from engine.http.engine_metrics import EngineStats
from engine.http.errors import APIError, bad_request
from engine.http.metrics import RequestMetrics
from engine.protocol import ChatMessage, Submit
from engine.tokenizer import TextCodec

log = logging.getLogger(__name__)


def model_name(cfg: GatewayConfig) -> str:
    """The name clients pass as "model": --served-model-name, else the model spec's own."""
    if cfg.served_model_name:
        return cfg.served_model_name
    from engine.models import ModelNotFoundError, resolve_model

    try:
        return resolve_model(cfg.model).name
    except ModelNotFoundError:
        return cfg.model


class Gateway:
    """Everything a route needs from the engine. ``start()`` follows the stats stream in a
    task (first asking the broker where it is, without ``cfg.stats_connect``); ``close()``
    stops it and closes both sockets (cancelling requests in flight)."""

    def __init__(self, cfg: GatewayConfig, codec: TextCodec) -> None:
        self.cfg = cfg
        self.codec = codec
        self.model_name = model_name(cfg)
        self.model_names = {self.model_name, cfg.model}
        self.started_at = time.time()
        self._curve = None
        if cfg.curve_secret_key:
            self._curve = ClientKeys.load(cfg.curve_secret_key, cfg.curve_server_key or "")
        self.client = AsyncClient(cfg.connect, timeout_s=cfg.request_timeout_s, curve=self._curve)
        self.stats_addr = cfg.stats_connect  # None until the broker says where (_find_stats)
        self.subscriber: AsyncStatsSubscriber | None = None
        if self.stats_addr is not None:
            self.subscriber = self._subscribe(self.stats_addr)
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, self.model_name)
        self.engine = EngineStats(self.registry, self.model_name, cfg.stats_stale_s)
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._follower = asyncio.create_task(self._follow_stats(), name="gateway-stats")

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        await self.client.close()
        if self.subscriber is not None:
            self.subscriber.close()

    def _subscribe(self, addr: str) -> AsyncStatsSubscriber:
        return AsyncStatsSubscriber(addr, latest_only=False, curve=self._curve)

    async def _find_stats(self) -> AsyncStatsSubscriber:
        """Ask the broker at cfg.connect where it publishes its stats, until it answers."""
        while True:
            try:
                found = await find_stats_address(self.cfg.connect, curve=self._curve)
            except Exception:  # a bug here must not leave the gateway without stats for good
                log.exception("asking the broker at %s for its stats address failed; retrying",
                              self.cfg.connect)  # fmt: skip
                found = None
            if found is not None:
                log.info("the broker at %s publishes its stats at %s", self.cfg.connect, found)
                self.stats_addr = found
                return self._subscribe(found)
            await asyncio.sleep(1.0)

    async def _follow_stats(self) -> None:
        if self.subscriber is None:
            self.subscriber = await self._find_stats()
        while True:
            try:
                snap = await self.subscriber.recv(timeout_s=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop health and metrics for good
                log.exception("reading the stats stream failed; retrying")
                await asyncio.sleep(1.0)
                continue
            if snap is not None:
                self.engine.update(snap)

    # -- questions the routes ask -----------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        """404 unless ``name`` is this gateway's model (or omitted)."""
        if name is not None and name not in self.model_names:
            raise APIError(
                404,
                "model_not_found",
                f"the model {name!r} does not exist: this server serves {self.model_name!r} "
                "(GET /v1/models lists it)",
                param="model",
            )

    def unavailable(self) -> APIError | None:
        """Why no request can be served now (no stats, no worker, draining), or None."""
        snap = self.engine.fresh()
        if snap is None and self.stats_addr is None:
            return APIError(
                503,
                "engine_unreachable",
                f"no broker answers at {self.cfg.connect} (asked where it publishes its stats): "
                "is the engine running (`run.py serve`), and is --connect its client address?",
            )
        if snap is None:
            return APIError(
                503,
                "engine_unreachable",
                f"no stats from the broker at {self.stats_addr} for "
                f"{self.cfg.stats_stale_s:g} s: is the engine running (`run.py serve`), and "
                "is --stats-connect its stats address?",
            )
        if snap.draining:
            return APIError(503, "shutting_down", "the engine is shutting down: retry elsewhere")
        if snap.num_workers == 0:
            return APIError(
                503,
                "no_workers",
                "no worker is connected to the broker: start one with `run.py worker`",
            )
        return None

    def check_available(self) -> None:
        error = self.unavailable()
        if error is not None:
            raise error

    @property
    def stats(self) -> StatsSnapshot | None:
        return self.engine.fresh()

    def default_max_tokens(self, prompt_len: int) -> int:
        """A chat without max_tokens: as many as the engine and the context allow; a 400 when
        the prompt leaves no room in the context."""
        room = self.codec.max_context_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                "prompt_too_long",
                f"the messages are {prompt_len:,} tokens after the chat template, which leaves "
                f"room for only {max(0, room)} tokens of the model's context of "
                f"{self.codec.max_context_len:,}: shorten them",
                param="messages",
            )
        snap = self.engine.latest
        max_gen_len = snap.max_gen_len if snap is not None else 1024
        return min(max_gen_len, room)

    def tokenize(
        self, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None
    ) -> list[int]:
        """Token ids as the broker counts them: the same tokenizer and chat template."""
        chat = None if messages is None else [ChatMessage(**m) for m in messages]
        try:
            return self.codec.encode_prompt(Submit(prompt=prompt, messages=chat))
        except SubmitError as exc:
            raise bad_request(exc.message, param="messages") from None

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        """A 400 naming ``param`` unless every id is in the model's vocabulary."""
        for i, t in enumerate(token_ids):
            if not 0 <= t < self.codec.vocab_size:
                raise bad_request(
                    f"{param}[{i}] is {t}: token ids are in [0, {self.codec.vocab_size})",
                    param=param,
                )

    def detokenize(self, token_ids: list[int]) -> str:
        self.check_token_ids(token_ids, "tokens")
        return self.codec.decode(token_ids)
