"""The Policy interface and the read-only views a policy plans from.

A policy is pure: ``schedule()`` reads the waiting requests and the workers' predicted state and
returns dispatches; it never mutates anything. The broker core owns all state, applies the plan
and checks it (no request twice, predicted memory within budget).

The views are frozen msgspec structs rather than dataclasses: the broker builds one per running
request per round (thousands a round at tens of workers), and a struct is about 7 times
cheaper to build than a frozen dataclass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgspec

if TYPE_CHECKING:
    from engine.cost_model import CostModel


class WaitingRequest(msgspec.Struct, frozen=True):
    """A request the broker holds that is not running anywhere."""

    request_id: str
    context_len: int  # prompt + tokens generated so far (what a recompute must prefill)
    prompt_len: int
    num_generated: int
    max_new_tokens: int  # tokens it may still generate (max_tokens - num_generated), >= 1
    arrived_at: float  # monotonic seconds, when the broker received it
    kv_worker_id: str | None = None  # worker that holds its parked KV cache, if any
    kv_on_host: bool = False  # that KV is in the holder's host tier (a restore costs a copy)
    # per worker: tokens of its context that worker's prefix cache holds (a prefill there skips
    # them); workers without a hit are absent
    cached_tokens: Mapping[str, int] = msgspec.field(default_factory=dict)


class RunningRequest(msgspec.Struct, frozen=True):
    """A request in a worker's running set or dispatched queue."""

    request_id: str
    context_len: int  # current context length (grows by one per decode step)
    max_new_tokens: int  # tokens it may still generate from now on
    reserved_tokens: int  # KV tokens reserved for it at admission (ILS reserve accounting)
    slice_steps_left: int = 0  # steps left in its current dispatch (its slice); 0: unknown
    arrived_at: float = 0.0  # monotonic seconds, when the broker received it

    @property
    def steps_left(self) -> int:
        """Steps it may still take where it runs: its slice's rest, or all it may generate."""
        return self.slice_steps_left or self.max_new_tokens


class WorkerView(msgspec.Struct, frozen=True):
    """What the broker knows and predicts about one worker at planning time."""

    worker_id: str
    cost: CostModel  # this worker's calibrated time and memory models
    busy_until: float  # predicted monotonic time when its dispatched work ends (<= now: idle)
    num_queued_batches: int  # dispatched batches that have not started yet
    running: tuple[RunningRequest, ...]  # requests running or queued on it
    # KV parked on it between slices (keep mode). The worker evicts parked KV (oldest first, the
    # request then recomputes) when a new batch needs the room, so a sequential batch may use the
    # whole budget; a policy may prefer a request's own worker to save its prefill.
    parked_kv_bytes: int
    # it reports sampled tokens every this many steps (Ready.stream_interval): what ``running``
    # says of a request's progress may be this less one steps behind
    stream_interval: int = 1


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One batch for one worker. ``join``: admit into the running set now (ILS); otherwise run as
    its own batch after the worker's current work (SLS, SCLS). ``handoff_ids``: requests whose
    KV, parked on another worker, this worker pulls from there; any other request parked
    elsewhere recomputes (the broker frees its KV on the holder). ``renew``: the requests are
    running on that worker and their current slice is extended by ``max_steps`` (capped by
    what each may still generate) before it ends, so that they run on without a stop."""

    worker_id: str
    request_ids: tuple[str, ...]
    max_steps: int  # decode steps this batch may run (slice length, or L)
    join: bool
    padded_len: int  # longest context in the batch
    predicted_s: float
    predicted_peak_bytes: int
    handoff_ids: tuple[str, ...] = ()
    renew: bool = False


class Policy(Protocol):
    """Decides which waiting requests run where, for how many steps."""

    name: str

    def schedule(
        self,
        waiting: Sequence[WaitingRequest],
        workers: Sequence[WorkerView],
        now: float,
    ) -> list[Dispatch]:
        """Return dispatches to apply now (possibly none). Called while requests wait or run:
        ``waiting`` may be empty (a policy may then renew running slices). Contract: each
        request id at most once; ``max_steps`` >= 1; memory: a sequential batch's predicted peak within the worker's
        budget, and for a join dispatch the running set's reservations plus the new ones within
        it (optimistic ILS may instead admit on current usage: the worker preempts the newest
        request when a step would exceed the budget)."""
        ...
