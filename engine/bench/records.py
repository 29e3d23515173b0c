"""What one benchmark run records: per-request client-side timestamps, the engine's stats
timeline, its batch records and events. Plain dataclasses, JSON-able through ``asdict``.

Times are seconds from the run's start (``time.monotonic()`` when the first request is due),
taken in the benchmark process on each stream delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: finish_reason values of a request the benchmark did not see finish normally.
NOT_FINISHED = ("cancelled", "error", "timeout", "stalled", "not_sent")
#: Of those, a request the run's cut-off left unfinished (--max-duration, or a stall) rather
#: than one that ended in an error.
CUT_SHORT = ("cancelled", "timeout", "stalled", "not_sent")


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it. ``chunk_times_s[i]``: when the i-th delta that carried
    tokens arrived; ``chunk_tokens[i]``: how many tokens it carried."""

    index: int
    prompt_len: int
    output_len: int  # tokens asked for (max_tokens with ignore_eos)
    scheduled_s: float | None  # when the arrival process wanted it sent (None: closed loop)
    request_id: str = ""
    submitted_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    num_output_tokens: int = 0
    finish_reason: str = (
        "not_sent"  # stop | length | cancelled | error | timeout | stalled | not_sent
    )
    num_slices: int = 0  # dispatches the engine made for it (peers: 1; 0: unknown)
    excess_tokens: int = 0  # tokens received beyond output_len (hidden lengths), not counted
    hidden_length: bool = False  # max_tokens exceeded output_len: the client cancelled at it
    cached_tokens: int = 0  # prompt tokens the engine served from its prefix cache
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.finish_reason not in NOT_FINISHED and self.error is None

    @property
    def cut_short(self) -> bool:
        """Left unfinished by the run's cut-off (not sent, still running, or stalled)."""
        return self.finish_reason in CUT_SHORT

    def take_tokens(self, at_s: float, num: int) -> None:
        """Count ``num`` tokens that arrived at ``at_s``; those beyond ``output_len`` (generated
        before a hidden length's cancel landed) are excess, not counted."""
        used = min(num, self.output_len - self.num_output_tokens)
        self.add_chunk(at_s, used)
        self.excess_tokens += num - used

    def add_chunk(self, at_s: float, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if self.first_token_s is None:
            self.first_token_s = at_s
        self.chunk_times_s.append(at_s)
        self.chunk_tokens.append(num_tokens)
        self.num_output_tokens += num_tokens


@dataclass(slots=True)
class WorkerSample:
    """One worker in one stats snapshot."""

    worker_id: str
    busy: bool  # the broker had batches dispatched to it (running or queued)
    busy_s: float  # the broker's cumulative sum of measured dispatch durations
    generated_tokens: int
    num_running_requests: int
    kv_used_bytes: int
    kv_parked_bytes: int
    kv_predicted_peak_bytes: int
    kv_budget_bytes: int


@dataclass(slots=True)
class TimelineSample:
    at_s: float
    num_waiting: int
    num_running: int
    workers: list[WorkerSample]
    num_preempted: int = 0  # the broker's count since it started


@dataclass(slots=True)
class RunResult:
    """One policy, peer or endpoint run of the workload.

    ``batches``: the engine's BatchRecords of this run (as dicts), deduplicated by batch id;
    ``num_batches_missed``: batch ids that finished but whose record never reached the
    benchmark (the snapshot keeps the latest 64). ``workers_start``/``workers_end``: each
    worker's cumulative busy seconds and generated tokens before and after the load.

    ``cut_off_s``: when the run was cut short (seconds from its start: the --max-duration
    limit, or the moment a stall was detected), None when every request ended by itself;
    throughputs of a cut-short run divide by it. ``stall``: why the run made no progress
    (see loadgen.stall_report, runner.engine_stall and peers.cache_state), None when it never
    stalled.
    """

    name: str
    kind: str  # "policy" | "peer" | "endpoint"
    repeat: int
    config: dict[str, Any]
    requests: list[RequestRecord]
    duration_s: float
    wall_s: float  # including engine start and stop
    timeline: list[TimelineSample] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    num_batches_missed: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    workers_start: dict[str, dict[str, float]] = field(default_factory=dict)
    workers_end: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # peer-specific facts and counters
    cut_off_s: float | None = None
    stall: dict[str, Any] | None = None
