"""One log line per ended request, at INFO on the ``engine.requests`` logger: its id, prompt and
output tokens, time to first token, end-to-end latency, slices, how it ended and its worker.
With ``--log-format json`` the same facts are fields of the JSON object. Pure: no I/O of its own."""

from __future__ import annotations

import logging
from typing import Any

from engine.broker.requests import Request

log = logging.getLogger("engine.requests")


def request_fields(req: Request, outcome: str) -> dict[str, Any]:
    """The facts of an ended request (``req.finished_at`` set); ``outcome``: its finish reason
    ("stop", "length", "cancelled") or "error:CODE" for a request failed with an Error."""
    end = req.finished_at if req.finished_at is not None else req.arrived_at
    ttft = None if req.first_token_at is None else req.first_token_at - req.arrived_at
    queued_until = req.first_dispatched_at if req.first_dispatched_at is not None else end
    return {
        "request_id": req.request_id,
        "outcome": outcome,
        "prompt_tokens": len(req.prompt_ids),
        "output_tokens": len(req.generated),
        "queued_s": round(queued_until - req.arrived_at, 6),
        "ttft_s": None if ttft is None else round(ttft, 6),
        "e2e_s": round(end - req.arrived_at, 6),
        "num_slices": req.num_slices,
        "worker_id": req.worker_id,
    }


def format_line(fields: dict[str, Any]) -> str:
    """``request r1 stop: 12 prompt + 34 output tokens, ttft 0.120 s, e2e 1.234 s, 2 slices,
    worker w1``."""
    ttft = "n/a" if fields["ttft_s"] is None else f"{fields['ttft_s']:.3f} s"
    return (
        f"request {fields['request_id']} {fields['outcome']}: {fields['prompt_tokens']} prompt + "
        f"{fields['output_tokens']} output tokens, ttft {ttft}, e2e {fields['e2e_s']:.3f} s, "
        f"{fields['num_slices']} slice(s), worker {fields['worker_id'] or '-'}"
    )


def log_request_end(req: Request, outcome: str, code: str | None = None) -> None:
    """Log the end of ``req``: call once, where the request ends (finished, cancelled, or
    failed with error ``code``)."""
    level = logging.INFO if code is None else logging.WARNING
    if log.isEnabledFor(level):
        fields = request_fields(req, outcome if code is None else f"error:{code}")
        log.log(level, format_line(fields), extra={"fields": fields})
