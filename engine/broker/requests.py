"""The request table's entries: every request's state, tokens and timestamps."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine import protocol as p
from engine.broker.text import Decode, TextStream


class RequestState(enum.Enum):
    WAITING = "waiting"  # in the pool: not yet run, or between slices
    RUNNING = "running"  # dispatched to a worker
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self not in (RequestState.WAITING, RequestState.RUNNING)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    client_id: bytes
    prompt_ids: list[int]
    params: p.SamplingParams  # as submitted
    stream: bool
    text: TextStream
    arrived_at: float
    generated: list[int] = field(default_factory=list)
    state: RequestState = RequestState.WAITING
    worker_id: str | None = None  # where it runs now
    batch_id: int | None = None
    num_slices: int = 0
    generated_at_dispatch: int = 0  # len(generated) when its current batch was dispatched
    dispatch_steps: int = 0  # decode steps its current dispatch allows (its slice)
    renewed_from: list[int] = field(default_factory=list)  # budgets its renewals extended
    first_dispatched_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    waiting_since: float = 0.0
    owner: bytes = b""  # the client's CURVE public key (b"" without CURVE): who may resume it
    fingerprint: bytes = b""  # see broker/resume.py: what a resubmission must repeat
    deadline_at: float | None = None
    cached_tokens: int = 0  # prompt tokens its first dispatch found in the prefix cache

    @classmethod
    def create(
        cls,
        request_id: str,
        client_id: bytes,
        msg: p.Submit,
        prompt_ids: list[int],
        decode: Decode,
        now: float,
    ) -> Request:
        return cls(
            request_id=request_id,
            client_id=client_id,
            prompt_ids=prompt_ids,
            params=msg.sampling(),
            stream=msg.stream,
            text=TextStream(decode, msg.stop),
            arrived_at=now,
            waiting_since=now,
        )

    @property
    def context_len(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def queued_tokens(self) -> int:
        """What it counts against --max-queued-tokens: prompt plus max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def max_new_tokens(self) -> int:
        """Tokens it may still generate."""
        return self.params.max_tokens - len(self.generated)

    def batch_item(self, max_steps: int, keep_kv: bool) -> p.BatchItem:
        return p.BatchItem(
            request_id=self.request_id,
            token_ids=self.prompt_ids + self.generated,
            num_generated=len(self.generated),
            max_steps=max_steps,
            max_new_tokens=self.max_new_tokens,
            sampling=self.params,
            keep_kv=keep_kv,
        )

    def finished_message(self, reason: p.FinishReason) -> p.Finished:
        end = self.finished_at if self.finished_at is not None else self.arrived_at
        first_token = None if self.first_token_at is None else self.first_token_at - self.arrived_at
        queued_until = self.first_dispatched_at if self.first_dispatched_at is not None else end
        return p.Finished(
            request_id=self.request_id,
            finish_reason=reason,
            text=self.text.text,
            token_ids=list(self.generated),
            usage=p.Usage(
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.generated),
                cached_tokens=self.cached_tokens,
            ),
            timings=p.Timings(
                queued_s=queued_until - self.arrived_at,
                first_token_s=first_token,
                finished_s=end - self.arrived_at,
            ),
            num_slices=self.num_slices,
        )

    def info(self, kv_holder: str | None = None) -> p.RequestInfo:
        """Its row in the stats; ``kv_holder``: where its KV is parked, if anywhere."""
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrived_at
        latency = None if self.finished_at is None else self.finished_at - self.arrived_at
        return p.RequestInfo(
            request_id=self.request_id,
            state=self.state.value,
            prompt_tokens=len(self.prompt_ids),
            generated_tokens=len(self.generated),
            num_slices=self.num_slices,
            worker_id=self.worker_id or kv_holder,
            ttft_s=ttft,
            latency_s=latency,
        )
