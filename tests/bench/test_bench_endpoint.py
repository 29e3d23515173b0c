"""`run.py bench --endpoint URL`: the same load over an OpenAI-compatible HTTP server (this
engine's gateway in front of a real engine on the tiny model; a scripted server for the other
dialects)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import httpx
import pytest

from engine.bench import endpoint
from engine.bench.cli import bench_main
from engine.bench.loadgen import LoadItem
from engine.bench.progress import Progress

# tests/http is not a package: its helpers are imported as its own tests import them.
sys.path.insert(0, str(Path(__file__).parents[1] / "http"))

WORKLOAD = "synthetic:prompt=uniform:8:24,output=uniform:4:24"


@pytest.fixture(scope="module")
def gateway_url(tiny_model_dir):
    from engine_helpers import local_engine
    from gateway_helpers import gateway_for

    with local_engine(
        tiny_model_dir, num_workers=1, policy="scls", slice_len=8, max_gen_len=64
    ) as engine:
        with gateway_for(engine, tiny_model_dir) as gw:
            gw.wait_ready()
            yield f"{gw.url}/v1"


@pytest.mark.timeout(120)
def test_endpoint_entry_through_the_gateway(tiny_model_dir, gateway_url, tmp_path):
    out = tmp_path / "endpoint"
    code = bench_main([
        "--model", str(tiny_model_dir), "--endpoint", gateway_url, "--workload", WORKLOAD,
        "--num-requests", "6", "--max-gen-len", "64", "--arrival", "poisson:50", "--seed", "1",
        "--no-plots", "--out", str(out), "--max-duration", "60",
    ])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["summary"]) == ["endpoint"]  # no --policies: no engine of the bench's own
    config = doc["runs"]["endpoint"][0]["config"]["endpoint"]
    assert config["model"] == "tiny"  # the only one GET /v1/models lists
    assert config["prompt"] == "token_ids" and config["usage"] is True
    assert config["length_control"] == ["ignore_eos"]  # the gateway refuses min_tokens
    summary = doc["summary"]["endpoint"]
    assert summary["completed"] == 6 and summary["complete"] is True
    assert summary["num_length_mismatches"] == 0 and summary["output_throughput"] > 0
    for rec in doc["runs"]["endpoint"][0]["requests"]:
        assert rec["finish_reason"] == "length" and rec["num_output_tokens"] == rec["output_len"]
        assert rec["submitted_s"] <= rec["first_token_s"] <= rec["finished_s"]
        assert sum(rec["chunk_tokens"]) == rec["num_output_tokens"]
    for key in ("mean_slices_per_request", "pad_tokens", "peak_measured_bytes", "oom_count"):
        assert summary[key] is None, key  # the engine behind the server is not seen
    assert summary["error_requests"] == 0
    text = (out / "results.md").read_text()
    assert f"- endpoint `endpoint`: {gateway_url}, model `tiny`, prompts as token ids" in text
    assert "| endpoint | 6 |" in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "error: endpoint: cannot reach http://127.0.0.1:{port}/v1 ("),
        (["--lengths", "hidden"], "error: --lengths hidden cancels each request at its length"),
        (["--policies", "ils", "--endpoint", "ils=http://x/v1"], "error: --endpoint name ils"),
    ],
)
def test_bad_endpoint_is_one_line(tiny_model_dir, tmp_path, capsys, extra, message):
    port = _free_port()  # nothing listens there: connection refused
    code = bench_main([
        "--model", str(tiny_model_dir), "--endpoint", f"http://127.0.0.1:{port}/v1",
        "--workload", WORKLOAD, "--num-requests", "2", "--out", str(tmp_path), *extra,
    ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(message.format(port=port)), err
    assert "\n" not in err and "Traceback" not in err


class _ScriptedServer:
    """An OpenAI-compatible server as httpx sees it (a mock transport): like Ollama, it refuses
    token-id prompts and sends no usage; like this engine's gateway, it refuses min_tokens;
    it streams ``output_len`` tokens two to a chunk (so the chunk count is not the token
    count), then a finish_reason."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": "m1"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if not isinstance(body["prompt"], str) or "min_tokens" in body:
            return httpx.Response(400, json={"error": {"message": "prompt must be a string"}})
        num = body["max_tokens"]
        chunks = [{"choices": [{"text": "ab", "finish_reason": None}]}] * (num // 2)
        chunks += [{"choices": [{"text": "c" * (num % 2), "finish_reason": "length"}]}]
        events = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=events, headers={"content-type": "text/event-stream"})


def test_a_server_that_takes_text_and_sends_no_usage(monkeypatch):
    server = _ScriptedServer()
    monkeypatch.setattr(
        endpoint,
        "_client",
        lambda key, timeout: httpx.AsyncClient(transport=httpx.MockTransport(server)),
    )
    items = [LoadItem(0, [5, 6, 7, 8], output_len=5), LoadItem(1, [9, 10], output_len=4)]
    (ep,) = endpoint.resolve_all(
        endpoint.parse_endpoints(["ollama=http://scripted/v1"]), None, None, items,
        lambda ids: " ".join(map(str, ids)),
    )  # fmt: skip
    assert (ep.name, ep.model, ep.prompt) == ("ollama", "m1", "text")
    assert ep.length_control == ("ignore_eos",) and ep.usage is False
    assert [type(b["prompt"]).__name__ for b in server.bodies] == ["list"] * 4 + ["str"] * 2
    driven = asyncio.run(
        endpoint.run_endpoint_load(
            ep, None, items, ["5 6 7 8", "9 10"], None, 2, 30.0, 5.0, "t", Progress("t", 2)
        )
    )
    assert server.bodies[-1]["prompt"] in ("5 6 7 8", "9 10")
    # Without usage the benchmark counts chunks: 2 + 1 for 5 tokens, 2 (+ an empty one) for 4.
    assert [r.num_output_tokens for r in driven.records] == [3, 2]
    assert all(r.finish_reason == "length" for r in driven.records)


def test_recount_makes_the_servers_usage_the_total():
    item = LoadItem(0, [1], output_len=6)
    rec = endpoint.RequestRecord(0, 1, 6, scheduled_s=0.0, submitted_s=0.0)
    for at_s in (0.1, 0.2, 0.3):
        rec.add_chunk(at_s, 1)
    rec.finished_s = 0.4
    endpoint.recount(item, rec, 6)
    assert rec.chunk_tokens == [1, 1, 4] and rec.num_output_tokens == 6
    endpoint.recount(item, rec, 2)  # fewer tokens than chunks: the last chunks give them back
    assert rec.chunk_tokens == [1, 1] and rec.chunk_times_s == [0.1, 0.2]
    endpoint.recount(item, rec, 8)  # beyond the length asked for: excess, not counted
    assert rec.num_output_tokens == 6 and rec.excess_tokens == 2
