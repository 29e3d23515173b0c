"""The wire contract: every message between clients, the broker and workers, and one codec per link.

Client <-> broker messages are msgpack maps with a ``type`` field and named fields (see
docs/PROTOCOL.md), so any language with msgpack and ZeroMQ can speak them. Broker <-> worker
messages are compact array-like structs; they are internal, versioned by ``PROTOCOL_VERSION``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import msgspec

#: Version of the internal broker <-> worker messages (2: sessions, Ping, Reset, Draining;
#: 3: BatchItem carries one SamplingParams).
PROTOCOL_VERSION = 3
#: Client frames larger than this make libzmq drop the connection before any decoding
#: (``zmq.MAXMSGSIZE``); the client library refuses to send them. With the socket's receive
#: queue limit it bounds the memory one connection can hold in the broker.
MAX_CLIENT_FRAME_BYTES = 1024 * 1024


class ProtocolError(ValueError):
    """A frame that cannot be decoded into a known message; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# Client -> broker


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's


def messages_problem(messages: Sequence[ChatMessage]) -> str:
    """The first message a chat template should not get, as a message saying what to change
    ("" if none): an unknown role would reach the template as text (a typo, silently)."""
    if not messages:
        return "messages is empty: pass at least one message"
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            return f"messages[{i}].role is {m.role!r}: use one of {', '.join(CHAT_ROLES)}"
    return ""


DEFAULT_MAX_TOKENS = 256  # a Submit that leaves max_tokens out; the CLI's default too


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Everything besides the prompt that shapes a request's output, said once: the client
    builds it, Submit carries its fields flat (Submit extends it, so the wire stays a flat map),
    the broker keeps it per request, and BatchItem carries it to the worker, which samples with
    it. Defaults are the protocol's (docs/PROTOCOL.md, Submit)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0  # 1.0 disables nucleus sampling
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None  # None: not reproducible
    stop: list[str] = []  # stop strings (the broker cuts the text; workers ignore them)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def sampling(self) -> SamplingParams:
        """These parameters alone (from a Submit, which extends them)."""
        if type(self) is SamplingParams:
            return self
        return SamplingParams(**{name: getattr(self, name) for name in _SAMPLING_FIELDS})

    def problem(self) -> str:
        """The first value out of its range, as a message saying what to pass ("" if none).
        The engine's own limits (max_tokens against --max-gen-len) are the broker's to check."""
        if self.max_tokens < 1:
            return f"max_tokens must be >= 1, got {self.max_tokens}"
        if not 0.0 <= self.temperature < math.inf:  # also catches NaN
            return f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}"
        if not 0.0 < self.top_p <= 1.0:
            return f"top_p must be in (0, 1] (1.0 disables it), got {self.top_p}"
        if self.top_k < 0:
            return f"top_k must be >= 0 (0 disables it), got {self.top_k}"
        if self.seed is not None and not 0 <= self.seed < 2**63:
            return f"seed must be in [0, 2**63), got {self.seed}"
        empty = [i for i, stop in enumerate(self.stop) if not stop]
        if empty:
            return f"stop[{empty[0]}] is empty: every stop string needs a character"
        return ""


_SAMPLING_FIELDS = SamplingParams.__struct_fields__


class Submit(SamplingParams, tag="submit", tag_field="type", kw_only=True, omit_defaults=True):
    """Generate from exactly one of ``prompt`` (text), ``prompt_ids`` or ``messages`` (chat),
    with the SamplingParams fields beside these (flat on the wire)."""

    request_id: str | None = None  # None: the broker assigns one and returns it in Accepted
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    stream: bool = False
    deadline_s: float | None = None  # the broker ends it with "deadline_exceeded" after this


class Cancel(msgspec.Struct, tag="cancel", tag_field="type", kw_only=True):
    request_id: str


class GetStats(msgspec.Struct, tag="get_stats", tag_field="type", kw_only=True):
    pass


ClientRequest = Submit | Cancel | GetStats

# ---------------------------------------------------------------------------------------------
# Broker -> client


class Accepted(msgspec.Struct, tag="accepted", tag_field="type", kw_only=True):
    request_id: str
    prompt_tokens: int
    resumed: bool = False  # a resubmission (same id and parameters) joined the request in flight


class Delta(msgspec.Struct, tag="delta", tag_field="type", kw_only=True):
    """New tokens of a streaming request, in order, each exactly once."""

    request_id: str
    text: str
    token_ids: list[int]


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from a worker's prefix cache


class Timings(msgspec.Struct, kw_only=True):
    """Durations in seconds from the broker's receipt of the request."""

    queued_s: float  # until its first batch was dispatched
    first_token_s: float | None  # time to first token (None: no token was generated)
    finished_s: float  # end-to-end latency


FinishReason = Literal["stop", "length", "cancelled", "error"]


class Finished(msgspec.Struct, tag="finished", tag_field="type", kw_only=True):
    request_id: str
    finish_reason: FinishReason
    text: str
    token_ids: list[int]
    usage: Usage
    timings: Timings
    num_slices: int = 0


class Error(msgspec.Struct, tag="error", tag_field="type", kw_only=True):
    """``code`` is one of ERROR_CODES; ``message`` says what to change."""

    code: str
    message: str
    request_id: str | None = None
    retry_after_s: float | None = None  # "overloaded": when a retry is likely to be accepted


ERROR_CODES = (
    "malformed",  # the frame is not msgpack at all
    "invalid_request",  # not a map with a known "type", or a field missing, mistyped, out of range
    "prompt_too_long",  # prompt plus max_tokens exceeds the model's context
    "duplicate_request_id",  # a live request already has this id
    "unknown_request",  # cancel of an id the broker does not know
    "overloaded",  # the broker's queue is full: retry after retry_after_s
    "deadline_exceeded",  # the request did not finish within its deadline_s
    "shutting_down",  # the broker is draining: it accepts nothing new, or stopped the request
    "internal",  # the engine failed this request (a worker could not run it); not the client's fault
    "resumed_elsewhere",  # a resubmission from another connection took this request over
)

# ---------------------------------------------------------------------------------------------
# Stats (broker -> clients on request, and published on the PUB socket)


class BatchInfo(msgspec.Struct, kw_only=True):
    batch_id: int
    num_requests: int
    padded_len: int
    max_steps: int
    predicted_s: float
    predicted_peak_bytes: int
    step: int = 0
    num_finished: int = 0


class BatchRecord(msgspec.Struct, kw_only=True):
    """What a worker measured for one dispatched batch, beside what the cost model predicted."""

    batch_id: int
    worker_id: str
    policy: str
    num_requests: int
    padded_len: int
    steps: int
    max_steps: int
    prefill_tokens: int
    pad_tokens: int
    invalid_tokens: int
    recomputed_tokens: int
    reused_kv_tokens: int
    generated_tokens: int
    predicted_s: float
    measured_s: float
    predicted_peak_bytes: int
    measured_peak_bytes: int
    early_return: bool
    handoff_tokens: int = 0  # of reused_kv_tokens: handed off by another worker
    handoff_bytes: int = 0
    restored_tokens: int = 0  # of reused_kv_tokens: restored from the host tier


class WorkerStats(msgspec.Struct, kw_only=True):
    worker_id: str
    device: str
    state: str  # "idle" | "busy" | "lost"
    queued: list[BatchInfo]
    running: list[BatchInfo]
    num_running_requests: int
    kv_used_bytes: int  # measured by the worker (live batch plus parked KV)
    kv_parked_bytes: int
    kv_predicted_peak_bytes: int
    kv_budget_bytes: int
    mem_used_bytes: int | None  # device (GPU) or process (CPU) memory; None when unknown
    mem_total_bytes: int | None
    util_percent: float | None
    tokens_per_s: float
    generated_tokens: int
    busy_s: float
    kv_host_bytes: int = 0  # KV offloaded to host memory (its own budget, below)
    kv_host_budget_bytes: int = 0
    # prefix cache: tokens in the blocks it holds (by the broker's index), and since it joined,
    # context tokens looked up at admission and of those found (vLLM's queries and hits)
    prefix_cached_tokens: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0


class RequestInfo(msgspec.Struct, kw_only=True):
    request_id: str
    state: str  # "waiting" | "running" | "finished" | "cancelled" | "failed"
    prompt_tokens: int
    generated_tokens: int
    num_slices: int
    worker_id: str | None
    ttft_s: float | None
    latency_s: float | None


class LogEvent(msgspec.Struct, kw_only=True):
    at_s: float  # seconds since the broker started
    level: str  # "info" | "warning" | "error"
    message: str


class EngineInfo(msgspec.Struct, kw_only=True):
    """What this engine serves and the limits a request must respect (docs/PROTOCOL.md, 10)."""

    model: str  # the broker's model spec (its tokenizer; every worker serves the same model)
    max_context_len: int  # prompt plus max_tokens must fit (the smallest of every worker's)
    vocab_size: int  # prompt_ids must be in [0, vocab_size)
    max_gen_len: int  # the most max_tokens a request may ask for
    max_client_frame_bytes: int  # the largest frame a client may send
    max_queued_requests: int | None  # None: no limit
    max_queued_tokens: int | None  # None: no limit
    stats_addr: str  # where the broker publishes snapshots, as bound (0.0.0.0: any interface)


class StatsSnapshot(msgspec.Struct, tag="stats", tag_field="type", kw_only=True):
    uptime_s: float
    policy: str
    slice_len: int
    max_gen_len: int
    kv_mode: str
    num_workers: int
    num_waiting: int
    num_running: int
    num_finished: int
    num_failed: int
    request_throughput: float  # finished requests per second over the recent window
    token_throughput: float  # generated tokens per second over the recent window
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    workers: list[WorkerStats]
    requests: list[RequestInfo]  # most recent first, bounded
    events: list[LogEvent]  # most recent last, bounded
    batches: list[BatchRecord]  # most recent last, bounded
    num_rejected: int = 0  # submissions refused as "overloaded" since start
    num_preempted: int = 0  # requests a worker's memory guard sent back since start
    draining: bool = False  # the broker is shutting down: it accepts no new request
    info: EngineInfo | None = None  # the model and limits; None from an older broker
    num_rejected_by_code: dict[str, int] = {}  # refused frames (first reply an Error), by code


ClientReply = Accepted | Delta | Finished | Error | StatsSnapshot

_client_request_decoder = msgspec.msgpack.Decoder(ClientRequest)
_client_reply_decoder = msgspec.msgpack.Decoder(ClientReply)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    """Encode any message of this module to msgpack bytes."""
    return _encoder.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder, frame: bytes):
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError("invalid_request", f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed", f"frame is not valid msgpack: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for a str that is not UTF-8
        raise ProtocolError("malformed", f"a string is not valid UTF-8: {exc.reason}") from None
    except RecursionError:  # msgspec skips an unknown field's value recursively
        raise ProtocolError(
            "malformed", "the frame nests arrays or maps too deeply: flatten the message"
        ) from None


def decode_client_request(frame: bytes) -> ClientRequest:
    """Decode a client frame; raises ProtocolError with a code and a message that says what to fix."""
    return _decode(_client_request_decoder, frame)


def decode_client_reply(frame: bytes) -> ClientReply:
    return _decode(_client_reply_decoder, frame)


# ---------------------------------------------------------------------------------------------
# Broker <-> worker (internal, array-like, versioned)


class _W(msgspec.Struct, array_like=True, tag=True, omit_defaults=False, gc=False):
    pass


class TimeModelParams(msgspec.Struct, array_like=True, gc=False):
    """Coefficients of the time model (see engine/cost_model.py); seconds."""

    prefill: list[float]
    decode: list[float]


class Ready(_W, tag="ready"):
    """A worker's first message: who it is and what it can hold."""

    version: int
    worker_id: str
    device: str
    model: str
    dtype: str
    kv_bytes_per_token: int
    kv_budget_bytes: int
    max_context_len: int
    eos_token_ids: list[int]
    mem_total_bytes: int | None
    time_model: TimeModelParams | None
    peer_addr: str = ""  # where peers pull this worker's parked KV (its handoff ROUTER)
    host_kv_budget_bytes: int = 0  # the host tier's budget for offloaded KV
    copy_bytes_per_s: float = 0.0  # measured host <-> device copy rate (0: not measured)
    transfer_bytes_per_s: float = 0.0  # measured handoff rate through its peer socket
    transfer_latency_s: float = 0.0
    session: int = 0  # bumped at every reset: commands of older sessions are dropped
    kv_block_tokens: int = 0  # tokens per block of its paged KV pool (0: one left-padded cache)
    # the root of its prefix-cache block names (engine/prefix_hash.py); empty: no prefix cache
    prefix_root: bytes = b""
    # it sends Generated every this many steps (and at once for a request's first token and
    # before any release): the broker's view of a running request lags by up to this less one
    stream_interval: int = 1


class Heartbeat(_W, tag="hb"):
    progress: int  # decode steps done since start: a hung compute loop stops moving it
    kv_used_bytes: int
    kv_parked_bytes: int
    mem_used_bytes: int | None
    util_percent: float | None
    kv_host_bytes: int = 0  # KV offloaded to the host tier
    session: int = 0


class BatchItem(_W, tag="item"):
    """One request in a batch: its whole context and what it may do in this dispatch."""

    request_id: str
    token_ids: list[int]  # prompt + tokens generated so far
    num_generated: int  # how many of token_ids were generated (sampling seeds are per index)
    max_steps: int  # decode steps allowed in this dispatch (the slice budget)
    max_new_tokens: int  # tokens it may still generate in total (max_tokens - num_generated)
    sampling: SamplingParams  # the request's, as submitted
    keep_kv: bool  # park the KV cache on the worker if the budget ends before the request
    kv_source: str = ""  # a peer's address: pull this request's parked KV from there first


class RunBatch(_W, tag="run"):
    """Run these requests. ``join``: admit them into the running set at the next step (ILS);
    otherwise start them as a batch once the running set is empty (SLS, SCLS)."""

    batch_id: int
    items: list[BatchItem]
    join: bool
    predicted_s: float
    predicted_peak_bytes: int
    max_steps: int  # the batch's step budget (max over items)
    session: int = 0  # the worker session it was planned for; a worker drops other sessions'


class Abort(_W, tag="abort"):
    """Stop these requests now and free their KV (cancel, stop string, broker decision)."""

    request_ids: list[str]


class Renew(_W, tag="renew"):
    """Extend the slices of running requests before they end, so that they run on without a
    stop: each (request id, max_steps) gives the new step budget of that request's current
    dispatch, in all. A request that already left (its slice ended first) is not affected: the
    broker then sees its Released as usual."""

    renewals: list[tuple[str, int]]


class DropKV(_W, tag="drop_kv"):
    """Free parked KV of these requests (they will continue elsewhere or were finished)."""

    request_ids: list[str]


class Shutdown(_W, tag="shutdown"):
    pass


class Ping(_W, tag="ping"):
    """The broker's heartbeat (every heartbeat interval): a worker that hears nothing for its
    timeout resets itself and announces itself again with Ready. ``draining``: the broker saw
    this worker's Draining, so every RunBatch it will ever get has been sent before this Ping."""

    draining: bool = False


class Reset(_W, tag="reset"):
    """The broker forgot this worker (lost, hung, or frames from a stranger): if ``session`` is
    the worker's current one, drop every request and parked KV, then send Ready, session + 1."""

    session: int
    reason: str


class Generated(_W, tag="gen"):
    """Tokens produced since the last message, per request, in order (coalesced steps)."""

    tokens: list[tuple[str, list[int]]]


ReleaseReason = Literal["eos", "length", "budget", "aborted", "preempted", "error"]


class Released(_W, tag="released"):
    """Requests that left the running set; ``kv_kept``: the KV stays parked on this worker."""

    batch_id: int
    request_id: str
    reason: ReleaseReason
    num_generated: int  # tokens generated in this dispatch
    kv_kept: bool
    message: str = ""
    cached_tokens: int = 0  # tokens of its context this dispatch found in the prefix cache


class BatchDone(_W, tag="done"):
    """Measurements of one dispatched batch, sent when its last request left."""

    batch_id: int
    steps: int
    prefill_tokens: int
    pad_tokens: int
    invalid_tokens: int
    recomputed_tokens: int
    reused_kv_tokens: int
    generated_tokens: int
    measured_s: float
    measured_peak_bytes: int
    # (batch size, padded length, seconds) of each prefill and (batch size, context, seconds) of
    # decode steps, for online refinement of the time model; bounded per batch.
    prefill_samples: list[tuple[int, int, float]]
    decode_samples: list[tuple[int, int, float]]
    handoff_tokens: int = 0  # of reused_kv_tokens: handed off by a peer
    handoff_bytes: int = 0
    restored_tokens: int = 0  # of reused_kv_tokens: restored from the host tier
    transfer_samples: list[tuple[int, float]] = []  # (bytes, seconds) of handoffs received
    copy_samples: list[tuple[int, float]] = []  # (bytes, seconds) of host-to-device restores
    # (decode rows, their mean context, prefill rows, their mean length, seconds) of steps
    # that prefilled new rows inside the decode forward
    mixed_samples: list[tuple[int, int, int, int, float]] = []
    # prefix cache: context tokens of rows that started without KV (looked up), and of those,
    # tokens found in the cache (vLLM's prefix_cache_queries and prefix_cache_hits)
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0


class BlockEvents(_W, tag="blocks"):
    """Changes to the worker's prefix cache since its last BlockEvents: names of full KV blocks
    it now holds (``stored``) and no longer holds (``removed``). The broker's prefix index of
    this worker is the sum of these since its Ready (a reset starts it empty)."""

    stored: list[bytes]
    removed: list[bytes]


class KVEvicted(_W, tag="evicted"):
    """Parked KV the worker moved to make room: freed (these requests must recompute), or with
    ``offloaded`` moved to its host tier (still reusable there, or by a handoff)."""

    request_ids: list[str]
    offloaded: bool = False


class WorkerFailed(_W, tag="failed"):
    """The worker could not run a batch (bad input, internal error); its requests are released."""

    batch_id: int
    message: str


class Draining(_W, tag="draining"):
    """The worker is shutting down: dispatch nothing more to it. It finishes what it holds and
    exits after the next Ping, or at ``deadline_s`` disconnects (the broker requeues the rest)."""

    deadline_s: float


ToWorker = RunBatch | Renew | Abort | DropKV | Shutdown | Ping | Reset
FromWorker = (
    Ready
    | Heartbeat
    | Generated
    | Released
    | BatchDone
    | KVEvicted
    | WorkerFailed
    | Draining
    | BlockEvents
)

_to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
_from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def decode_to_worker(frame: bytes) -> ToWorker:
    return _decode(_to_worker_decoder, frame)


def decode_from_worker(frame: bytes) -> FromWorker:
    return _decode(_from_worker_decoder, frame)
