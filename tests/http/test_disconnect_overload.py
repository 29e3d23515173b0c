"""A client that leaves mid-request cancels it on the engine (streamed or not); past the
broker's queue bound a request gets 429 with Retry-After. One slowed worker, so that long
requests are still running when the test acts."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from engine_helpers import ANY_PORT, local_engine
from gateway_helpers import GatewayThread, gateway_for
from prometheus_client.parser import text_string_to_metric_families

from engine.client import Client
from engine.config import BrokerConfig, SchedulerConfig
from engine.launcher import LocalEngine

pytestmark = pytest.mark.timeout(120)
MAX_QUEUED = 3
LONG = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def slow_engine(tiny_model_dir) -> Iterator[LocalEngine]:
    with local_engine(
        tiny_model_dir, num_workers=1, extra_worker_args=["--slowdown", "30"], slice_len=8,
        max_gen_len=256,
    ) as eng:  # fmt: skip
        yield eng


@pytest.fixture(scope="module")
def slow_gateway(slow_engine, tiny_model_dir) -> Iterator[GatewayThread]:
    with gateway_for(slow_engine, tiny_model_dir) as gw:
        gw.wait_ready()
        yield gw


def request_state(engine: LocalEngine, request_id: str) -> tuple[str, int] | None:
    with Client(engine.client_addr) as client:
        for info in client.stats().requests:
            if info.request_id == request_id:
                return info.state, info.generated_tokens
    return None


def wait_state(engine: LocalEngine, request_id: str, state: str, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while (seen := request_state(engine, request_id)) is None or seen[0] != state:
        assert time.monotonic() < deadline, f"{request_id} is {seen}, never {state}"
        time.sleep(0.05)
    return seen[1]


def counter(gateway: GatewayThread, name: str, **labels: str) -> float:
    """A counter's value (its _total sample with these labels), 0 when absent."""
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for s in family.samples:
                if s.name.endswith("_total") and labels.items() <= s.labels.items():
                    return s.value
    return 0.0


def aborted_count(gateway: GatewayThread) -> float:
    return counter(gateway, "vllm:request_success", finished_reason="abort")


def test_leaving_a_stream_cancels_the_request(slow_engine, slow_gateway):
    before = aborted_count(slow_gateway)
    body = {"prompt": "Once upon a time", "stream": True, **LONG}
    with (
        httpx.Client(base_url=slow_gateway.url, timeout=30) as http,
        http.stream(
            "POST", "/v1/completions", json=body, headers={"X-Request-Id": "leave-stream"}
        ) as reply,
    ):
        assert reply.status_code == 200
        events = reply.iter_lines()
        first = next(line for line in events if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert request_state(slow_engine, "leave-stream")[0] in ("running", "waiting")
    # the connection is closed here, long before 200 tokens at this speed
    generated = wait_state(slow_engine, "leave-stream", "cancelled")
    assert generated < LONG["max_tokens"]
    deadline = time.monotonic() + 5
    while aborted_count(slow_gateway) < before + 1:
        assert time.monotonic() < deadline, "the abort was not counted"
        time.sleep(0.05)


def test_leaving_a_whole_request_cancels_it_and_counts_its_tokens(slow_engine, slow_gateway):
    prompt = "Once upon a time"
    body = json.dumps({"prompt": prompt, **LONG}).encode()
    port = int(slow_gateway.url.rsplit(":", 1)[1])
    tokens = ("vllm:prompt_tokens", "vllm:generation_tokens")
    before = [counter(slow_gateway, name) for name in tokens]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: leave-whole\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        deadline = time.monotonic() + 10
        while (seen := request_state(slow_engine, "leave-whole")) is None or seen[1] == 0:
            assert time.monotonic() < deadline, f"leave-whole is {seen}, no token yet"
            time.sleep(0.05)
    generated = wait_state(slow_engine, "leave-whole", "cancelled")
    assert 0 < generated < LONG["max_tokens"]
    # its tokens are counted, as a stream's are (docs/METRICS.md)
    tokenized = httpx.post(f"{slow_gateway.url}/tokenize", json={"prompt": prompt}, timeout=10)
    ran = [tokenized.json()["count"], generated]

    def counted() -> list[float]:
        return [counter(slow_gateway, name) - before[i] for i, name in enumerate(tokens)]

    deadline = time.monotonic() + 5
    while (added := counted()) != ran:
        assert time.monotonic() < deadline, f"counted {added} tokens, the engine ran {ran}"
        time.sleep(0.05)


def test_request_timeout_names_the_gateways_limit(slow_engine, tiny_model_dir):
    with gateway_for(slow_engine, tiny_model_dir, request_timeout_s=1.0) as gw:
        gw.wait_ready()
        reply = httpx.post(f"{gw.url}/v1/completions", json={"prompt": "hi", **LONG}, timeout=30)
    assert reply.status_code == 504, reply.text
    error = reply.json()["error"]
    assert error["code"] == "deadline_exceeded" and error["type"] == "timeout_error"
    assert "--request-timeout" in error["message"] and "of 1 s" in error["message"], error
    assert "timeout_s" not in error["message"] and "tokens received" not in error["message"]


def test_request_ids_are_scoped_by_api_key(slow_engine, tiny_model_dir):
    """The same X-Request-Id from callers with different keys: two requests, neither taking
    over or replaying the other's; each caller sees its own id."""
    body = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    with (
        gateway_for(slow_engine, tiny_model_dir, api_keys=("k1", "k2")) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as http,
    ):
        gw.wait_ready()
        as_k1 = {"Authorization": "Bearer k1", "X-Request-Id": "cross-3"}
        as_k2 = {"Authorization": "Bearer k2", "X-Request-Id": "cross-3"}
        streamed = body | {"stream": True}
        with http.stream("POST", "/v1/completions", json=streamed, headers=as_k1) as first:
            assert first.status_code == 200 and first.headers["x-request-id"] == "cross-3"
            lines = first.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            second = http.post("/v1/completions", json=streamed, headers=as_k2)
            assert second.status_code == 200, second.text  # its own request, to its end
            assert second.headers["x-request-id"] == "cross-3"
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "error" not in last, last  # not taken over (resumed_elsewhere)
        assert last["choices"][0]["finish_reason"] == "length"
        one = http.post("/v1/completions", json=body, headers=as_k1 | {"X-Request-Id": "same"})
        two = http.post("/v1/completions", json=body, headers=as_k2 | {"X-Request-Id": "same"})
        for reply in (one, two):
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-request-id"] == "same" and reply.json()["id"] == "cmpl-same"
        # two engine requests (k2's is not k1's finished one replayed)
        assert one.json()["scls"]["request_id"] != two.json()["scls"]["request_id"]


def test_overload_is_429_with_retry_after_and_recovers(tiny_model_dir):
    cfg = BrokerConfig(
        client_addr=ANY_PORT, worker_addr=ANY_PORT, stats_addr=ANY_PORT,
        model=str(tiny_model_dir), stats_interval_s=0.1, max_queued_requests=MAX_QUEUED,
        scheduler=SchedulerConfig(slice_len=8, max_gen_len=256),
    )  # fmt: skip
    worker_args = ["--model", str(tiny_model_dir), "--threads", "1", "--no-profile",
                   "--kv-budget", "64MiB", "--slowdown", "30"]  # fmt: skip
    with (
        LocalEngine(cfg, num_workers=1, worker_args=worker_args, start_timeout_s=90) as eng,
        gateway_for(eng, tiny_model_dir) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as http,
        contextlib.ExitStack() as streams,
    ):
        gw.wait_ready()
        body = {"prompt": "Once upon a time", "stream": True, **LONG}
        for _ in range(MAX_QUEUED):  # accepted as soon as the stream's response starts
            reply = streams.enter_context(http.stream("POST", "/v1/completions", json=body))
            assert reply.status_code == 200
        refused = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "overloaded"
        sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.completions.create(model="tiny", prompt="hi", max_tokens=2)
        sdk.close()
        streams.close()  # leaving the streams cancels them: the queue empties
        deadline = time.monotonic() + 20
        while (
            reply := http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        ).status_code != 200:
            assert reply.status_code == 429 and time.monotonic() < deadline, reply.text
            time.sleep(0.1)


def test_no_worker_is_503_and_health_says_so(tiny_model_dir):
    with (
        local_engine(tiny_model_dir, num_workers=0) as eng,
        gateway_for(eng, tiny_model_dir) as gw,
        httpx.Client(base_url=gw.url, timeout=10) as http,
    ):
        deadline = time.monotonic() + 10
        while gw.gateway.stats is None:  # the first snapshot
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "no_workers"
        reply = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "no_workers"


def test_unreachable_broker_is_503(slow_engine, tiny_model_dir):
    nowhere = "tcp://127.0.0.1:9"  # no stats stream there
    with gateway_for(slow_engine, tiny_model_dir, stats_connect=nowhere) as gw:
        reply = httpx.get(f"{gw.url}/health", timeout=10)
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "engine_unreachable"
