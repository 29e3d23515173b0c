"""The gateway's one frozen config: where the broker is, where to listen, limits and keys."""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    connect: str = "tcp://127.0.0.1:5555"
    """The broker's client address (ZeroMQ)."""
    stats_connect: str | None = None
    """The broker's stats address: health, engine-wide gauges and the scls: counters. None:
    ask the broker at ``connect`` where it publishes them (as `run.py tui` does)."""
    model: str = "embedded"
    """The broker's model spec: the gateway loads its tokenizer (no weights) for /tokenize,
    /detokenize, the context length and the default max_tokens of a chat."""
    served_model_name: str | None = None
    """The name clients pass as "model" (None: the model spec's own name)."""
    bind: str = "127.0.0.1"
    """Interface to listen on; loopback unless told otherwise."""
    port: int = 8000
    """HTTP port (0: any free port, printed once bound)."""
    metrics_only: bool = False
    """Serve only /metrics and /health (`run.py serve --metrics-port` without an HTTP API)."""
    api_keys: tuple[str, ...] = ()
    """Bearer tokens accepted on /v1/*, /tokenize and /detokenize (empty: no authentication)."""
    request_timeout_s: float = 600.0
    """Longest a request may run, sent to the broker as its deadline_s (seconds)."""
    max_body_bytes: int = 1024 * 1024
    """Largest request body accepted (bytes); beyond it a 413. The broker's own frame limit is
    1 MiB, so a larger body could not be forwarded anyway."""
    header_timeout_s: float = 10.0
    """A connection must send a request's headers within this many seconds (slow clients)."""
    body_timeout_s: float = 10.0
    """... and its body within this many seconds after the headers, else a 408."""
    max_connections: int = 1024
    """Open connections beyond which new requests get a 503 at once (uvicorn's limit)."""
    stats_stale_s: float = 3.0
    """No stats snapshot for this long: the broker counts as unreachable (health 503)."""
    curve_secret_key: str | None = None
    """This gateway's CURVE key pair file, with a broker started with --curve."""
    curve_server_key: str | None = None
    """The broker's public key file (broker.key), with curve_secret_key."""

    @property
    def is_loopback(self) -> bool:
        return self.bind in LOOPBACK_HOSTS or self.bind.startswith("127.")
