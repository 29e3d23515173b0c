"""What a policy plans from (engine/scheduler/base.py), built from the broker's state: one
``WaitingRequest`` per waiting request and one ``WorkerView`` per worker. Pure functions of
the request table, the workers and the KV ledger; no zmq, no torch."""

from __future__ import annotations

from collections.abc import Mapping

from engine.broker.kv_ledger import KVLedger
from engine.broker.requests import Request
from engine.broker.workers import WorkerState
from engine.scheduler.base import RunningRequest, WaitingRequest, WorkerView


def waiting_view(req: Request, kv: KVLedger, cached_tokens: Mapping[str, int]) -> WaitingRequest:
    """``cached_tokens``: per worker, tokens of its context that worker's prefix cache holds."""
    return WaitingRequest(
        request_id=req.request_id,
        context_len=req.context_len,
        prompt_len=len(req.prompt_ids),
        num_generated=len(req.generated),
        max_new_tokens=req.max_new_tokens,
        arrived_at=req.arrived_at,
        kv_worker_id=kv.holder(req.request_id),
        kv_on_host=kv.on_host(req.request_id),
        cached_tokens=cached_tokens,
    )


def worker_view(worker: WorkerState, requests: Mapping[str, Request], kv: KVLedger) -> WorkerView:
    if worker.running_view is None:
        worker.running_view = running_view(worker, requests)
    return WorkerView(
        worker_id=worker.worker_id,
        cost=worker.cost,
        busy_until=worker.busy_until,
        num_queued_batches=len(worker.queued_batches()),
        running=worker.running_view,
        parked_kv_bytes=kv.parked_bytes(worker.worker_id),
        stream_interval=worker.ready.stream_interval,
    )


def running_view(
    worker: WorkerState, requests: Mapping[str, Request]
) -> tuple[RunningRequest, ...]:
    """The requests in the worker's batches, as the policy sees them. Cached on the worker
    (``running_view``) until a batch, a batch's requests, or one of their token counts or
    slices changes: every place in the broker core that changes one sets it to None."""
    running: list[RunningRequest] = []
    append, get = running.append, requests.get
    for batch in worker.batches.values():
        for rid in batch.request_ids:
            req = get(rid)
            if req is None:
                continue
            num_prompt, num_generated = len(req.prompt_ids), len(req.generated)
            max_tokens = req.params.max_tokens
            max_new = max_tokens - num_generated
            done = num_generated - req.generated_at_dispatch
            slice_left = max(1, min(req.dispatch_steps - done, max_new))
            append(
                RunningRequest(
                    rid,
                    num_prompt + num_generated,
                    max_new,
                    num_prompt + max_tokens,
                    slice_left,
                    req.arrived_at,
                )
            )
    return tuple(running)
