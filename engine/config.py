"""One frozen dataclass per component; every field documented with its unit.

Nothing here reads the environment: the CLI builds these from flags and hands each component
only its own config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PolicyName = Literal["scls", "scls:strict", "ils", "sls"]
KVMode = Literal["auto", "recompute", "keep"]
ILSAdmission = Literal["reserve", "optimistic"]

DEFAULT_KV_BUDGET_BYTES = 2 * 1024**3


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: PolicyName = "scls"
    slice_len: int = 64
    """SCLS: decode steps per slice (S)."""
    max_gen_len: int = 1024
    """Maximal generation length L in tokens: requests asking for more are rejected; SLS and
    reserve-ILS size batches for it."""
    kv_mode: KVMode = "auto"
    """Between slices: "auto" brings each request's KV cache wherever its next slice is cheapest
    (kept, restored from host memory, handed off to another worker, or recomputed: see
    docs/SCHEDULING.md); "keep" parks it on its worker only; "recompute" re-prefills it."""
    ils_admission: ILSAdmission = "reserve"
    """ILS: reserve L tokens per request at admission, or admit on current usage and preempt."""
    max_concurrency: int | None = None
    """ILS reserve: cap on running requests per worker (None: derived from the memory budget)."""
    max_batch_size: int = 256
    """Upper bound on requests in one batch or running set, whatever memory allows."""
    aging_s: float = 10.0
    """SCLS: a request waiting longer than this is batched first, whatever its length."""
    prefix_placement: bool = True
    """Place a request where the workers' prefix caches hold most of its prompt (within a load
    bound); False: by load alone (the caches still serve whatever hits they get)."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    client_addr: str = "tcp://127.0.0.1:5555"
    """Where clients connect (ROUTER). Loopback unless told otherwise."""
    worker_addr: str = "tcp://127.0.0.1:5556"
    """Where workers connect (ROUTER)."""
    stats_addr: str = "tcp://127.0.0.1:5557"
    """Where stats snapshots are published (PUB), for the dashboard."""
    model: str = "embedded"
    """Model spec for the tokenizer: "embedded", a transformers directory, or a .gguf file."""
    stats_interval_s: float = 0.25
    """Seconds between published stats snapshots."""
    worker_timeout_s: float = 3.0
    """A worker silent for this long is declared lost and its requests are requeued."""
    heartbeat_interval_s: float = 0.5
    """Seconds between the broker's Pings to each worker."""
    hang_factor: float = 4.0
    """A worker with dispatched batches whose progress counter stands still for
    worker_timeout_s + hang_factor x (predicted seconds of its longest batch) is declared hung."""
    client_grace_s: float = 5.0
    """Seconds a closed client connection's requests keep running, so that a client that
    reconnects can resume them by resubmitting; then they are cancelled."""
    max_queued_requests: int | None = 4096
    """Accepted, unfinished requests beyond which a Submit is refused "overloaded" (None: no limit)."""
    max_queued_tokens: int | None = None
    """Prompt plus max_tokens of accepted, unfinished requests beyond which a Submit is refused
    "overloaded" (None: no limit)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: seconds to finish accepted requests before stopping the rest."""
    curve_dir: str | None = None
    """CURVE keys (see engine/curve.py): DIR/broker.key_secret, allow-lists DIR/clients/*.key
    and DIR/workers/*.key. None: no encryption (loopback by default)."""
    journal_path: str | None = None
    """The request journal (SQLite, engine/broker/journal.py): accepted requests and the tokens
    they delivered, so that a broker restarted on it continues them. None: no journal."""
    scheduler: SchedulerConfig = SchedulerConfig()


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    connect: str = "tcp://127.0.0.1:5556"
    """The broker's worker address."""
    model: str = "embedded"
    """"embedded", a transformers model directory, or a .gguf file."""
    device: str = "cpu"
    """"cpu" or "cuda:N"."""
    dtype: str = "float32"
    """"float32" (default, exact greedy batching) or "bfloat16"/"float16"."""
    kv_budget_bytes: int | None = None
    """KV-cache budget in bytes. None: DEFAULT_KV_BUDGET_BYTES on a CPU; on a GPU what is free
    after the weights, less a safety margin."""
    num_threads: int | None = None
    """torch threads (CPU). None: this worker's share of the cores."""
    worker_id: str | None = None
    """Stable name; None: host-pid-device."""
    heartbeat_interval_s: float = 0.5
    broker_timeout_s: float = 3.0
    """No word from the broker for this long: reset and announce this worker again."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: seconds to finish what this worker holds before leaving anyway."""
    curve_secret_key: str | None = None
    """This worker's CURVE key pair file (``*.key_secret``); None: plain ZMTP."""
    curve_server_key: str | None = None
    """The broker's public key file (``broker.key``), with curve_secret_key."""
    profile: bool = True
    """Profile the device at start (cached per model, device and dtype) to fit the time model."""
    host_kv_budget_bytes: int | None = None
    """Host memory for KV caches offloaded between slices (pinned on a GPU; on a CPU a pool of
    its own, so that kv_budget_bytes keeps modelling device memory). None: 2 GiB; 0: none."""
    peer_bind: str = "tcp://127.0.0.1:*"
    """Where this worker serves its parked KV to peers (announced to the broker in Ready);
    loopback unless told otherwise, e.g. tcp://0.0.0.0:* for workers on several hosts."""
    slowdown: float = 1.0
    """Benchmarks only: every forward pass takes this many times as long (a slower device)."""
    step_log: str | None = None
    """A directory: every forward's shape and seconds are appended to ``<worker id>.jsonl`` there
    (what the simulator's calibration fits step times from)."""
    stream_interval: int = 1
    """Send sampled tokens every this many steps (always at once for a request's first token
    and before a release): fewer messages for the broker to handle, tokens in bursts."""
    prefix_cache: bool = True
    """Reuse the KV of full blocks whose tokens (and every token before them) equal those of an
    earlier request on this worker (automatic prefix caching)."""
