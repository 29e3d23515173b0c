"""Bad input gets a clear 4xx error object and the gateway keeps serving, with no task or
socket left behind; slow clients are cut off; SSE framing as curl sees it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import httpx
import pytest
from gateway_helpers import num_open_fds

pytestmark = pytest.mark.timeout(90)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

BAD_BODIES = [  # (path, body bytes, status, code, param)
    (COMPLETIONS, b'{"prompt": "x",', 400, "invalid_request", None),
    (COMPLETIONS, b"[1, 2]", 400, "invalid_request", None),
    (COMPLETIONS, b"", 400, "invalid_request", None),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": "5"}', 400, "invalid_request", "max_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": true}', 400, "invalid_request", "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "frobnicate": 1}', 400, "invalid_request", "frobnicate"),
    (COMPLETIONS, b'{"max_tokens": 1}', 400, "invalid_request", "prompt"),
    (COMPLETIONS, b'{"prompt": "\xff\xfe"}', 400, "invalid_request", None),
    (COMPLETIONS, b'{"prompt": ["a", "b"]}', 400, "invalid_request", "prompt"),
    (COMPLETIONS, b'{"prompt": ""}', 400, "invalid_request", "prompt"),
    (COMPLETIONS, b'{"prompt": "x", "n": 3}', 400, "invalid_request", "n"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 1000000000}', 400, "invalid_request", "max_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 1' + b"0" * 40 + b"}", 400, "invalid_request", "max_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "top_k": 1' + b"0" * 40 + b"}", 400, "invalid_request", "top_k"),
    (COMPLETIONS, b'{"prompt": "x", "seed": 1' + b"0" * 40 + b"}", 400, "invalid_request", "seed"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1' + b"0" * 40 + b"}", 400, "invalid_request", "max_completion_tokens"),
    (COMPLETIONS, b'{"prompt": [-1]}', 400, "invalid_request", "prompt"),
    (COMPLETIONS, b'{"prompt": [[1, 1' + b"0" * 30 + b']]}', 400, "invalid_request", "prompt"),
    (COMPLETIONS, b'{"prompt": "x", "logprobs": 2}', 400, "invalid_request", "logprobs"),
    (COMPLETIONS, b'{"prompt": "x", "suffix": "y"}', 400, "invalid_request", "suffix"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 0}', 400, "invalid_request", "max_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "invalid_request", "stream_options"),
    (COMPLETIONS, json.dumps({"prompt": [7] * 3000}).encode(), 400, "prompt_too_long", None),
    (COMPLETIONS, b'{"prompt": "x", "model": "nope"}', 404, "model_not_found", "model"),
    (CHAT, b'{"messages": []}', 400, "invalid_request", "messages"),
    (CHAT, b'{"messages": [{"role": "user"}]}', 400, "invalid_request", "messages[0].content"),
    (CHAT, b'{"messages": [{"content": "x"}]}', 400, "invalid_request", "messages[0].role"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x", "foo": 1}]}', 400, "invalid_request", "messages[0].foo"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}', 400, "invalid_request", "messages"),
    (CHAT, b'{"prompt": "x"}', 400, "invalid_request", "prompt"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true}', 400, "invalid_request", "logprobs"),
    ("/tokenize", b'{"prompt": "x", "messages": []}', 400, "invalid_request", None),
    ("/detokenize", b'{"tokens": [1, 99999]}', 400, "invalid_request", "tokens"),
]  # fmt: skip


def assert_error_object(reply: httpx.Response, status: int, code: str) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


def test_bad_input_gets_a_clear_error_and_leaves_nothing_behind(gateway):
    ok = {"prompt": "hello", "max_tokens": 2}
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        assert http.post(COMPLETIONS, json=ok).status_code == 200
    tasks, fds = gateway.num_tasks(), num_open_fds()
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        for path, body, status, code, param in BAD_BODIES:
            reply = http.post(path, content=body, headers={"content-type": "application/json"})
            error = assert_error_object(reply, status, code)
            assert error["param"] == param, (body, error)
        big = b'{"prompt": "' + b"a" * (gateway.cfg.max_body_bytes + 1) + b'"}'
        assert_error_object(http.post(COMPLETIONS, content=big), 413, "body_too_large")
        bad_id = {"x-request-id": "no spaces allowed"}
        assert_error_object(http.post(COMPLETIONS, json=ok, headers=bad_id), 400, "invalid_request")
        not_allowed = assert_error_object(http.get(COMPLETIONS), 405, "method_not_allowed")
        assert not_allowed["type"] == "invalid_request_error"
        assert_error_object(http.get("/v2/anything"), 404, "not_found")
        assert http.post(COMPLETIONS, json=ok).status_code == 200  # still serving
    settle_by = time.monotonic() + 5
    while (gateway.num_tasks(), num_open_fds()) > (tasks, fds) and time.monotonic() < settle_by:
        time.sleep(0.05)
    assert gateway.num_tasks() <= tasks, "tasks left behind on the gateway's loop"
    assert num_open_fds() <= fds, "sockets left open"


def test_slow_headers_are_cut_off(gateway):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))) as sock:
        sock.settimeout(0.2)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200
        closed = False
        for byte in head:  # a byte every 0.2 s: each keeps the connection busy, never complete
            assert time.monotonic() - started < 10, "the slow client was never cut off"
            try:
                sock.sendall(bytes([byte]))
                closed = sock.recv(1024) == b""
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
            if closed:
                break
    assert closed
    assert gateway.cfg.header_timeout_s <= time.monotonic() - started < 10


def test_slow_body_gets_408(gateway):
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"prompt": '
        )
        reply = b""
        while chunk := sock.recv(65536):  # the 408 closes the connection
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_sse_framing_as_curl_sees_it(gateway, path):
    body = {"max_tokens": 10, "stream": True, "temperature": 0, "ignore_eos": True}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hello"
    out = subprocess.run(
        ["curl", "-sN", "-D", "-", "--max-time", "20", f"{gateway.url}{path}",
         "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    head, _, stream = out.partition(b"\r\n\r\n")
    assert b"content-type: text/event-stream" in head.lower()
    assert b"x-request-id:" in head.lower()
    assert stream.endswith(b"data: [DONE]\n\n")
    events = stream.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "scls" in chunks[-1]


def test_health_version_tokenize_round_trip(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["num_workers"] == 1
        assert http.get("/version").json()["version"]
        ids = http.post("/tokenize", json={"prompt": "Paris is the capital"}).json()["tokens"]
        text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        assert text == "Paris is the capital"
        request_id = "my-request.1"
        reply = http.post(
            COMPLETIONS, json={"prompt": "hi", "max_tokens": 2},
            headers={"X-Request-Id": request_id},
        )  # fmt: skip
        assert reply.headers["x-request-id"] == request_id
        assert reply.json()["id"] == f"cmpl-{request_id}"


def test_keep_alive_responses_are_not_held_back(gateway):
    """A response's head and body leave at once (TCP_NODELAY): no delayed-ACK wait per request."""
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        http.get("/health")
        times = []
        for _ in range(11):
            started = time.perf_counter()
            http.get("/health")
            times.append(time.perf_counter() - started)
    assert sorted(times)[5] < 0.02, f"median {sorted(times)[5] * 1000:.0f} ms"


CHAT_HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
NO_OP_FIELDS = {  # OpenAI fields at their do-nothing values: accepted, as OpenAI's SDKs send them
    "tools": None, "tool_choice": None, "response_format": None, "parallel_tool_calls": None,
    "functions": None, "function_call": None, "metadata": None, "store": False,
    "service_tier": "auto", "user": "someone",
}  # fmt: skip
FEATURES_ASKED = [  # ... and values that ask for a feature the engine lacks: a 400 naming it
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}),
    ("parallel_tool_calls", True),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("metadata", {"a": "b"}),
    ("store", True),
    ("service_tier", "flex"),
]


def test_openai_no_op_fields_are_accepted_and_features_refused(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        reply = http.post(CHAT, json=CHAT_HI | NO_OP_FIELDS)
        assert reply.status_code == 200, reply.text
        for value in ("none", None):
            reply = http.post(CHAT, json=CHAT_HI | {"tool_choice": value})
            assert reply.status_code == 200, reply.text
        reply = http.post(CHAT, json=CHAT_HI | {"response_format": {"type": "text"}})
        assert reply.status_code == 200, reply.text
        options = {"include_usage": True, "continuous_usage_stats": False}
        body = {"prompt": "hi", "max_tokens": 2, "stream": True, "stream_options": options}
        assert http.post(COMPLETIONS, json=body | {"user": "u"}).status_code == 200
        for name, value in FEATURES_ASKED:
            error = assert_error_object(
                http.post(CHAT, json=CHAT_HI | {name: value}), 400, "invalid_request"
            )
            assert error["param"] == name and "not support" in error["message"], error
        options["continuous_usage_stats"] = True
        error = assert_error_object(http.post(COMPLETIONS, json=body), 400, "invalid_request")
        assert error["param"] == "stream_options.continuous_usage_stats"


def test_error_messages_name_what_the_client_sent(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        negative = http.post(COMPLETIONS, json={"prompt": [-1]}).json()["error"]
        assert negative["message"].startswith("prompt[0] is -1: token ids are in [0, ")
        huge = http.post(COMPLETIONS, json={"prompt": [5, 2**70]}).json()["error"]
        assert huge["message"].startswith(f"prompt[1] is {2**70}: token ids are in [0, ")
        no_content = http.post(CHAT, json={"messages": [{"role": "user"}]}).json()["error"]
        assert "content" in no_content["message"] and "tool" not in no_content["message"]
        for name in ("max_tokens", "top_k", "seed"):
            error = http.post(COMPLETIONS, json={"prompt": "x", name: 2**65}).json()["error"]
            assert error["param"] == name and "serialize" not in error["message"], error
        # a chat with no max_tokens whose prompt fills the context: no "max_tokens is 1"
        long_chat = {"messages": [{"role": "user", "content": "hi " * 3000}]}
        error = assert_error_object(http.post(CHAT, json=long_chat), 400, "prompt_too_long")
        assert "max_tokens is" not in error["message"], error
        assert "leaves room for only 0 tokens" in error["message"], error


def test_small_http_details(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        ok = {"prompt": "hi", "max_tokens": 2}
        reply = http.post(COMPLETIONS, json=ok, headers={"X-Request-Id": ""})  # as absent
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-request-id"] and reply.json()["id"] != "cmpl-"
        slash = http.post(COMPLETIONS + "/", json=ok)  # no redirect built from the Host header
        assert slash.status_code == 404 and "location" not in slash.headers
        assert slash.json()["error"]["code"] == "not_found"
        body = CHAT_HI | {"stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", CHAT, json=body) as stream:
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]" and len(chunks) >= 3
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), chunks
        assert chunks[-1]["usage"]["completion_tokens"] == 2 and chunks[-1]["choices"] == []
