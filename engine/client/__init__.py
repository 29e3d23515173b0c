"""The client library: AsyncClient and Client talk to the broker's client socket, and
AsyncStatsSubscriber follows its stats stream. The wire format is in docs/PROTOCOL.md."""

from engine.client.async_client import AsyncClient
from engine.client.connection import DEFAULT_ADDR
from engine.client.errors import (
    ClientClosed,
    Disconnected,
    EngineError,
    InvalidRequest,
    RequestRejected,
    RequestTimeout,
)
from engine.client.stats import DEFAULT_STATS_ADDR, AsyncStatsSubscriber
from engine.client.streams import AsyncStream
from engine.client.sync_client import Client, Stream
from engine.client.types import GenerateResult, SamplingArgs, TokenDelta
from engine.protocol import ChatMessage, SamplingParams, StatsSnapshot, Timings, Usage

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_STATS_ADDR",
    "AsyncClient",
    "AsyncStatsSubscriber",
    "AsyncStream",
    "ChatMessage",
    "Client",
    "ClientClosed",
    "Disconnected",
    "EngineError",
    "GenerateResult",
    "InvalidRequest",
    "RequestRejected",
    "RequestTimeout",
    "SamplingArgs",
    "SamplingParams",
    "StatsSnapshot",
    "Stream",
    "Timings",
    "TokenDelta",
    "Usage",
]
