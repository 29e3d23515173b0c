"""/metrics parsed with prometheus_client's parser: vLLM's names, and values that match the
requests that ran (usage, timings, slices, rejections), from a fresh gateway."""

from __future__ import annotations

import time

import httpx
import pytest
from gateway_helpers import gateway_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(90)

VLLM_NAMES = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
}
SCLS_NAMES = {
    "scls:broker_up", "scls:num_workers", "scls:draining", "scls:request_throughput",
    "scls:token_throughput", "scls:engine_requests_finished", "scls:engine_requests_failed",
    "scls:engine_requests_overloaded", "scls:worker_state", "scls:worker_queued_batches",
    "scls:worker_running_requests", "scls:kv_used_bytes", "scls:kv_parked_bytes",
    "scls:kv_offloaded_bytes", "scls:kv_budget_bytes", "scls:kv_host_budget_bytes",
    "scls:kv_predicted_peak_bytes", "scls:mem_used_bytes", "scls:mem_total_bytes",
    "scls:worker_tokens_per_second", "scls:worker_generated_tokens", "scls:worker_busy_seconds",
    "scls:prefix_cached_tokens", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
    "scls:request_slices", "scls:requests_rejected", "scls:batches", "scls:batch_early_returns",
    "scls:decode_steps", "scls:prefill_tokens", "scls:pad_tokens", "scls:invalid_tokens",
    "scls:recomputed_tokens", "scls:reused_kv_tokens", "scls:handoff_tokens",
    "scls:handoff_bytes", "scls:restored_tokens", "scls:batch_predicted_seconds",
    "scls:batch_measured_seconds", "scls:batch_time_ratio", "scls:batch_peak_ratio",
}  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    """Every sample, keyed "name{label=value,...}" (labels sorted), plus each family's name."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        samples[family.name] = 0.0
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def total(samples: dict[str, float], name: str) -> float:
    """Sum of a sample over its label sets."""
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


def test_metrics_match_what_ran(engine, tiny_model_dir):
    with (
        gateway_for(engine, tiny_model_dir) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as http,
    ):
        gw.wait_ready()
        before = scrape(gw.url)
        assert before.get("scls:broker_up{}") == 1.0
        usages, extras = [], []
        for i in range(4):
            body = {"max_tokens": 10 + i, "temperature": 0, "ignore_eos": True}
            if i % 2:
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "hi"}]
            else:
                path, body["prompt"] = "/v1/completions", "One two three"
            reply = http.post(path, json=body).json()
            usages.append(reply["usage"])
            extras.append(reply["scls"])
        bad = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
        assert bad.status_code == 400  # refused by the client library, before sending
        bad = http.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400  # refused by the gateway
        missing = http.post("/v1/completions", json={"prompt": "x", "model": "other"})
        assert missing.status_code == 404

        generated = sum(u["completion_tokens"] for u in usages)

        def caught_up(samples: dict[str, float]) -> bool:  # the stats stream lags a little
            worker_tokens = total(samples, "scls:worker_generated_tokens_total")
            done = worker_tokens - total(before, "scls:worker_generated_tokens_total")
            return done == generated and total(samples, "scls:batches_total") >= len(usages)

        deadline = time.monotonic() + 5
        while not caught_up(after := scrape(gw.url)):
            assert time.monotonic() < deadline, "the stats stream never showed these requests"
            time.sleep(0.1)

    missing = (VLLM_NAMES | SCLS_NAMES) - set(after)
    assert not missing, f"not exported: {sorted(missing)}"
    m = "model_name=tiny"
    assert after[f"vllm:request_success_total{{finished_reason=length,{m}}}"] == 4
    assert after[f"vllm:prompt_tokens_total{{{m}}}"] == sum(u["prompt_tokens"] for u in usages)
    assert after[f"vllm:generation_tokens_total{{{m}}}"] == sum(
        u["completion_tokens"] for u in usages
    )
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert after[f"vllm:{name}_count{{{m}}}"] == 4
    assert after[f"vllm:inter_token_latency_seconds_count{{{m}}}"] == sum(
        u["completion_tokens"] - 1 for u in usages
    )
    assert after[f"vllm:e2e_request_latency_seconds_sum{{{m}}}"] == pytest.approx(
        sum(e["finished_s"] for e in extras)
    )
    assert after[f"vllm:time_to_first_token_seconds_sum{{{m}}}"] == pytest.approx(
        sum(e["first_token_s"] for e in extras)
    )
    assert after[f"scls:request_slices_sum{{{m}}}"] == sum(e["num_slices"] for e in extras)
    assert after["scls:requests_rejected_total{code=invalid_request}"] == 2
    assert after["scls:requests_rejected_total{code=model_not_found}"] == 1
    assert total(after, "scls:decode_steps_total") > 0
    assert 0.0 <= after[f"vllm:kv_cache_usage_perc{{{m}}}"] <= 1.0
    assert after["scls:num_workers{}"] == 1
    (budget,) = [v for k, v in after.items() if k.startswith("scls:kv_budget_bytes{")]
    assert budget == 64 * 1024**2


def test_metrics_only_gateway_serves_no_api(engine, tiny_model_dir):
    with gateway_for(engine, tiny_model_dir, metrics_only=True) as gw:
        gw.wait_ready()
        assert scrape(gw.url)["scls:broker_up{}"] == 1.0
        assert httpx.get(f"{gw.url}/health", timeout=10).status_code == 200
        reply = httpx.post(f"{gw.url}/v1/completions", json={"prompt": "x"}, timeout=10)
        assert reply.status_code == 404
        message = reply.json()["error"]["message"]  # the routes this port serves, no others
        assert "/metrics" in message and "/health" in message, message
        assert "/v1/" not in message.split("(routes here:")[1], message
