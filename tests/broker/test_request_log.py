"""One log line per ended request (engine/broker/request_log.py), in text and in JSON."""

from __future__ import annotations

import json
import logging

from engine import protocol as p
from engine.broker.request_log import format_line, log_request_end, request_fields
from engine.broker.requests import Request, RequestState
from engine.logs import JsonFormatter


def ended_request() -> Request:
    msg = p.Submit(request_id="r7", prompt_ids=[1, 2, 3], max_tokens=8)
    req = Request.create("r7", b"c", msg, [1, 2, 3], lambda ids: "x" * len(ids), now=10.0)
    req.generated = [4, 5, 6, 7]
    req.first_dispatched_at, req.first_token_at, req.finished_at = 10.5, 10.75, 12.0
    req.num_slices, req.worker_id, req.state = 2, "w1", RequestState.FINISHED
    return req


def test_the_line_says_every_fact_of_the_request():
    fields = request_fields(ended_request(), "length")
    assert fields == {
        "request_id": "r7", "outcome": "length", "prompt_tokens": 3, "output_tokens": 4,
        "queued_s": 0.5, "ttft_s": 0.75, "e2e_s": 2.0, "num_slices": 2, "worker_id": "w1",
    }  # fmt: skip
    assert format_line(fields) == (
        "request r7 length: 3 prompt + 4 output tokens, ttft 0.750 s, e2e 2.000 s, "
        "2 slice(s), worker w1"
    )
    req = ended_request()
    req.first_token_at, req.worker_id, req.generated = None, None, []
    assert "ttft n/a" in format_line(request_fields(req, "cancelled"))
    assert format_line(request_fields(req, "cancelled")).endswith("worker -")


def test_info_for_an_ending_warning_for_a_failure_and_json_fields(caplog):
    with caplog.at_level(logging.INFO, logger="engine.requests"):
        log_request_end(ended_request(), "stop")
        log_request_end(ended_request(), "error", code="deadline_exceeded")
    ok, failed = caplog.records
    assert ok.levelno == logging.INFO and "request r7 stop:" in ok.getMessage()
    assert failed.levelno == logging.WARNING and "error:deadline_exceeded" in failed.getMessage()
    entry = json.loads(JsonFormatter().format(ok))
    assert entry["logger"] == "engine.requests" and entry["level"] == "INFO"
    assert entry["message"] == ok.getMessage() and entry["ttft_s"] == 0.75
    assert entry["outcome"] == "stop" and entry["ts"].endswith("Z")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.requests"):
        log_request_end(ended_request(), "stop")
    assert not caplog.records
