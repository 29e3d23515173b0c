"""What the broker does with a Submit before it becomes a request: a resubmission resumes the
request it repeats; anything else must pass validation, fit a worker and the bounded queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine import protocol as p
from engine.broker import admission
from engine.broker.validation import validate_submit
from engine.errors import SubmitError

JOURNAL_RETRY_S = 5.0  # the retry_after_s of a refusal while the journal cannot write

if TYPE_CHECKING:
    from engine.broker.core import BrokerCore


def resume(
    core: BrokerCore, client_id: bytes, request_id: str, fp: bytes, owner: bytes, stream: bool
) -> bool:
    """A resubmission from a new connection (same id, fingerprint and owner) joins the live
    request, or gets the finished one again; True when answered so (docs/PROTOCOL.md, 8)."""
    from engine.broker.core import ToClient

    req = core.requests.get(request_id)
    finished = None
    if req is not None:
        if req.client_id == client_id or req.fingerprint != fp or req.owner != owner:
            return False  # the same connection, or another request: duplicate_request_id
        taken_over = p.Error(
            code="resumed_elsewhere",
            message=f"request {request_id!r} was resubmitted from another connection, which "
            "receives the rest of it",
            request_id=request_id,
        )  # the final reply on the first connection, if it is still there to read it
        core.outbox.append(ToClient(req.client_id, taken_over))
        req.client_id, req.stream = client_id, stream
        core.expiry.adopt(request_id)
        text, token_ids, prompt_len = req.text.emitted, list(req.generated), len(req.prompt_ids)
    else:
        entry = core.finished_cache.match(request_id, fp, owner)
        if entry is None:
            return False
        finished = entry.finished
        text, token_ids, prompt_len = finished.text, finished.token_ids, entry.prompt_tokens
    accepted = p.Accepted(request_id=request_id, prompt_tokens=prompt_len, resumed=True)
    core.outbox.append(ToClient(client_id, accepted))
    if stream and (text or token_ids):  # catch-up: the new stream starts from the beginning
        catch_up = p.Delta(request_id=request_id, text=text, token_ids=token_ids)
        core.outbox.append(ToClient(client_id, catch_up))
    if finished is not None:
        core.outbox.append(ToClient(client_id, finished))
    return True


def check(core: BrokerCore, request_id: str, msg: p.Submit, prompt_ids: list[int]) -> None:
    """Raise SubmitError unless a new request may be accepted now."""
    if core.draining:
        raise SubmitError("shutting_down", "the broker is shutting down: submit elsewhere or later")
    if not core.journal.healthy:  # what it accepted must outlive it: refuse until it can write
        raise SubmitError("journal_unavailable", core.journal.problem, JOURNAL_RETRY_S)
    validate_submit(msg, prompt_ids, core.limits)
    _check_fits_a_worker(core, len(prompt_ids) + msg.max_tokens)
    if request_id in core.requests:
        raise SubmitError(
            "duplicate_request_id",
            f"request id {request_id!r} is already in flight: choose another id (or resubmit it "
            "with the same prompt and parameters from a new connection, to resume it)",
        )
    _admit(core, len(prompt_ids) + msg.max_tokens)


def _check_fits_a_worker(core: BrokerCore, num_tokens: int) -> None:
    """A request whose KV cannot fit even alone on the largest worker could never run."""
    if not core.workers:
        return  # checked by the policy once workers join; it waits meanwhile
    largest = max(w.cost.memory.max_request_tokens() for w in core.workers.values())
    if num_tokens > largest:
        raise SubmitError(
            "prompt_too_long",
            f"request rejected: prompt plus max_tokens is {num_tokens:,} tokens, but the largest "
            f"worker's KV budget holds {largest:,}: shorten it or raise the workers' --kv-budget",
        )


def _admit(core: BrokerCore, new_tokens: int) -> None:
    """Bounded queue: refuse "overloaded", with a retry-after estimate, past the limits."""
    limits = core.queue_limits
    too_big = limits.too_big(new_tokens)
    if too_big:
        raise SubmitError("prompt_too_long", too_big)
    if limits.excess(len(core.requests), core.num_queued_tokens, new_tokens) == (0, 0):
        return
    live = [
        admission.LiveRequest(r.max_new_tokens, r.queued_tokens, r.context_len)
        for r in core.requests.values()
    ]
    costs = [w.cost for w in core.workers.values() if not w.draining]
    try:
        admission.check(
            limits, live, core.num_queued_tokens, new_tokens, costs, core.cfg.max_batch_size
        )
    except admission.Overloaded as exc:
        core.num_rejected += 1
        raise SubmitError("overloaded", exc.message, exc.retry_after_s) from None
