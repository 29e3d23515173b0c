"""The gateway's pure parts, without an engine: request translation, error mapping, the
engine-wide metrics fed with synthetic snapshots, keys, flags, and the layering rule."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.client import Disconnected, InvalidRequest, RequestRejected, RequestTimeout
from engine.http import schema
from engine.http.auth import KeyFileError, load_keys
from engine.http.cli import serve_gateway_argv
from engine.http.engine_metrics import EngineStats
from engine.http.errors import APIError, from_engine
from engine.http.metrics import RequestMetrics
from engine.protocol import BatchRecord, StatsSnapshot, WorkerStats

ROOT = Path(__file__).resolve().parents[2]


# -- request translation ----------------------------------------------------------------------


def chat(**fields) -> schema.ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return schema.decode_body(msgspec.json.encode(body), schema.ChatCompletionRequest)


def test_openai_defaults_and_vllm_spellings():
    params = schema.sampling_params(chat())
    assert params == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": [],
                      "ignore_eos": False}  # fmt: skip
    params = schema.sampling_params(chat(top_k=-1, stop="END", temperature=0, seed=3))
    assert (params["top_k"], params["stop"], params["temperature"], params["seed"]) == (
        0, ["END"], 0.0, 3,
    )  # fmt: skip
    assert schema.requested_max_tokens(chat()) is None
    assert schema.requested_max_tokens(chat(max_completion_tokens=9)) == 9
    with pytest.raises(APIError, match="differ"):
        schema.requested_max_tokens(chat(max_tokens=3, max_completion_tokens=9))
    with pytest.raises(APIError, match="stream_options"):
        schema.include_usage(chat(stream_options={"include_usage": True}))
    assert schema.include_usage(chat(stream=True, stream_options={"include_usage": True}))


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("text", {"prompt": "text"}), (["text"], {"prompt": "text"}), ([1, 2], {"prompt_ids": [1, 2]}),
     ([[1, 2]], {"prompt_ids": [1, 2]})],
)  # fmt: skip
def test_one_prompt_in_any_of_openais_forms(prompt, expected):
    req = schema.CompletionRequest(prompt=prompt)
    assert schema.completion_prompt(req) == expected


@pytest.mark.parametrize("prompt", ["", [], ["a", "b"], [1, "a"], [True], [[1], [2]]])
def test_several_or_empty_prompts_are_refused(prompt):
    with pytest.raises(APIError) as err:
        schema.completion_prompt(schema.CompletionRequest(prompt=prompt))
    assert err.value.status == 400 and err.value.param == "prompt"


def test_text_parts_join_and_other_parts_are_refused():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    messages = [schema.ChatMessageIn(role="user", content=parts)]
    assert schema.chat_messages(messages) == [{"role": "user", "content": "ab"}]
    image = [schema.ChatMessageIn(role="user", content=[{"type": "image_url"}])]
    with pytest.raises(APIError, match="only text parts"):
        schema.chat_messages(image)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (RequestRejected("overloaded", "full", "r", retry_after_s=2.2), 429, "overloaded"),
        (RequestRejected("shutting_down", "bye", "r"), 503, "shutting_down"),
        (RequestRejected("prompt_too_long", "long", "r"), 400, "prompt_too_long"),
        (RequestRejected("duplicate_request_id", "dup", "r"), 409, "duplicate_request_id"),
        (RequestRejected("internal", "bug", "r"), 500, "internal"),
        (InvalidRequest("top_p must be in (0, 1]"), 400, "invalid_request"),
        (RequestTimeout("r", 5.0), 504, "deadline_exceeded"),
        (Disconnected("tcp://x:1", "gone"), 503, "engine_unreachable"),
    ],
)
def test_engine_errors_map_to_http(exc, status, code):
    error = from_engine(exc)
    assert (error.status, error.code) == (status, code)
    body = error.body()["error"]
    assert body["code"] == code and body["message"]
    if code == "overloaded":
        assert error.headers() == {"Retry-After": "3"}
    if isinstance(exc, InvalidRequest):
        assert body["param"] == "top_p"


# -- engine-wide metrics from snapshots ----------------------------------------------------------


def worker(worker_id: str, state: str = "idle", **fields) -> WorkerStats:
    return WorkerStats(
        worker_id=worker_id, device="cpu", state=state, queued=[], running=[],
        num_running_requests=0, kv_used_bytes=fields.get("kv_used_bytes", 0), kv_parked_bytes=0,
        kv_predicted_peak_bytes=0, kv_budget_bytes=100, mem_used_bytes=None,
        mem_total_bytes=None, util_percent=None, tokens_per_s=0.0, generated_tokens=0, busy_s=0.0,
    )  # fmt: skip


def record(batch_id: int, worker_id: str = "w1", pad_tokens: int = 3) -> BatchRecord:
    return BatchRecord(
        batch_id=batch_id, worker_id=worker_id, policy="scls", num_requests=2, padded_len=8,
        steps=4, max_steps=8, prefill_tokens=16, pad_tokens=pad_tokens, invalid_tokens=0,
        recomputed_tokens=5, reused_kv_tokens=0, generated_tokens=8, predicted_s=0.2,
        measured_s=0.1, predicted_peak_bytes=1000, measured_peak_bytes=900, early_return=True,
    )  # fmt: skip


def snap(uptime_s: float, workers, batches=(), **fields) -> StatsSnapshot:
    defaults = dict(
        policy="scls", slice_len=8, max_gen_len=256, kv_mode="auto", num_workers=len(workers),
        num_waiting=2, num_running=1, num_finished=0, num_failed=0, request_throughput=0.0,
        token_throughput=0.0, ttft_p50_s=None, ttft_p99_s=None, e2e_p50_s=None, e2e_p99_s=None,
        requests=[], events=[],
    )  # fmt: skip
    return StatsSnapshot(
        uptime_s=uptime_s, workers=list(workers), batches=list(batches), **(defaults | fields)
    )


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def samples(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = ",".join(f"{v}" for _, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_batches_counted_once_joins_and_losses_and_restart():
    registry, clock = CollectorRegistry(), Clock()
    stats = EngineStats(registry, "m", stale_after_s=3.0, clock=clock)
    stats.update(snap(1.0, [worker("w1")], [record(1)]))  # baseline: not counted
    stats.update(snap(1.1, [worker("w1"), worker("w2")], [record(1), record(2)]))
    stats.update(snap(1.2, [worker("w1"), worker("w2")], [record(1), record(2), record(3)]))
    s = samples(registry)
    assert s["scls:batches_total{w1}"] == 2 and s["scls:pad_tokens_total{w1}"] == 6
    assert s["scls:recomputed_tokens_total{w1}"] == 10
    assert s["scls:batch_time_ratio_count{w1}"] == 2 and s["scls:batch_time_ratio_sum{w1}"] == 1.0
    assert s["scls:worker_joins_total{w2}"] == 1 and "scls:worker_joins_total{w1}" not in s
    stats.update(snap(1.3, [worker("w1", "draining")]))  # w2 vanished: lost
    stats.update(snap(1.4, []))  # w1 left after draining: not a loss
    s = samples(registry)
    assert s["scls:worker_losses_total{w2}"] == 1 and "scls:worker_losses_total{w1}" not in s
    stats.update(snap(0.5, [worker("w1")], [record(1)]))  # the broker restarted: a new baseline
    stats.update(snap(0.6, [worker("w1")], [record(1), record(2)]))
    assert samples(registry)["scls:batches_total{w1}"] == 3


def test_gauges_follow_the_newest_snapshot_and_vanish_when_stale():
    registry, clock = CollectorRegistry(), Clock()
    stats = EngineStats(registry, "m", stale_after_s=3.0, clock=clock)
    assert samples(registry)["scls:broker_up{}"] == 0
    stats.update(snap(1.0, [worker("w1", kv_used_bytes=25), worker("w2", kv_used_bytes=75)]))
    s = samples(registry)
    assert s["scls:broker_up{}"] == 1 and s["vllm:kv_cache_usage_perc{m}"] == 0.5
    assert (s["vllm:num_requests_waiting{m}"], s["vllm:num_requests_running{m}"]) == (2, 1)
    assert s["scls:worker_state{cpu,idle,w1}"] == 1
    clock.now += 5
    s = samples(registry)
    assert s["scls:broker_up{}"] == 0 and "vllm:num_requests_waiting{m}" not in s


# -- keys, flags, layering -------------------------------------------------------------------------


def test_key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# ops team\nkey-a\n\n  key-b  \n")
    assert load_keys(str(path)) == ("key-a", "key-b")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_keys(str(tmp_path / "missing"))


def test_serve_children():
    args = argparse.Namespace(
        http_port=8000, metrics_port=9100, bind="127.0.0.1", model="embedded", log_level="INFO",
        served_model_name=None, api_key=["k"], api_key_file=None,
    )  # fmt: skip
    addrs = {"clients": "tcp://0.0.0.0:5555", "stats": "tcp://0.0.0.0:5557"}
    api, metrics = serve_gateway_argv(args, addrs, [])
    assert api[0] == "http" and "--metrics-only" not in api and "9100" not in api
    assert metrics[-3:] == ["--port", "9100", "--metrics-only"]
    assert "tcp://127.0.0.1:5555" in api and ["--api-key", "k"] == api[api.index("--api-key") :][:2]
    args.http_port = None
    assert len(serve_gateway_argv(args, addrs, [])) == 1
    args.metrics_port = None
    assert serve_gateway_argv(args, addrs, []) == []


def test_layering_the_gateway_is_a_client_of_the_broker():
    """engine/http reaches the engine through engine.client only: no torch, no zmq, no worker,
    scheduler or broker module."""
    from layering import ENGINE, imported_modules

    for path in sorted((ENGINE / "http").glob("*.py")):
        for name in imported_modules(path):
            assert name.split(".")[0] not in {"torch", "zmq"}, f"{path.name} imports {name}"
            assert not name.startswith(("engine.worker", "engine.scheduler", "engine.broker")), (
                f"{path.name} imports {name}"
            )


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "METRICS.md").read_text()
    return set(re.findall(r"`((?:vllm|scls):[a-z0-9_]+)`", text))


def test_every_metric_is_documented_and_the_dashboard_uses_only_those():
    registry, clock = CollectorRegistry(), Clock()
    RequestMetrics(registry, "m").refused("overloaded")
    stats = EngineStats(registry, "m", stale_after_s=3.0, clock=clock)
    full = worker("w1")
    full.mem_used_bytes, full.mem_total_bytes, full.util_percent = 1, 2, 3.0
    stats.update(snap(1.0, [worker("w0")]))
    stats.update(snap(1.1, [full], [record(1)]))  # w1 joined, w0 lost, one slice
    exported = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if not family.name.endswith("_created"):  # run_gateway turns these off, as vLLM does
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    documented = documented_metrics()
    assert exported - documented == set(), "exported but not in docs/METRICS.md"
    assert documented - exported == set(), "in docs/METRICS.md but never exported"
    dashboard = (ROOT / "examples" / "grafana-dashboard.json").read_text()
    exprs = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p.get("targets", [])]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", n)
        for e in exprs
        for n in re.findall(r"(?:vllm|scls):[a-z0-9_]+", e)
    }
    assert used and used <= documented, sorted(used - documented)
