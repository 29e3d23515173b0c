"""The blocking Client from plain functions and threads, against a scripted ROUTER peer."""

from __future__ import annotations

import gc
import threading

import pytest
from scripted_broker import echo, hold

from engine import protocol as p
from engine.client import (
    Client,
    ClientClosed,
    Disconnected,
    EngineError,
    RequestRejected,
    RequestTimeout,
)


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "engine-client"]


def test_generate_and_chat_from_a_plain_function(make_broker):
    broker = make_broker(echo)
    with Client(broker.addr) as client:
        assert client.generate("hello", max_tokens=2).text == "HE"
        assert client.chat([p.ChatMessage(role="user", content="hey")]).text == "HEY"
        assert client.stats().num_finished == 4


def test_a_stream_is_a_plain_iterator_with_the_result_afterwards(make_broker):
    broker = make_broker(echo)
    with Client(broker.addr) as client:
        stream = client.stream("abcde")
        got = list(stream)
        with client.stream("xyz") as s:
            texts = [d.text for d in s]
    assert [d.text for d in got] == ["AB", "CD", "E"] and stream.result.text == "ABCDE"
    assert texts == ["XY", "Z"] and s.result.finish_reason == "stop"


def test_next_then_cancel_then_the_rest(make_broker):
    broker = make_broker(hold)
    with Client(broker.addr) as client:
        stream = client.stream("abcdef", request_id="to-cancel")
        first = next(iter(stream))
        client.cancel("to-cancel")
        rest = list(stream)
    assert first.text == "AB" and [d.text for d in rest] == ["CD"]
    assert stream.result.finish_reason == "cancelled"


def test_breaking_out_of_a_for_loop_cancels_the_request(make_broker):
    broker = make_broker(hold)
    with Client(broker.addr) as client:
        for _ in client.stream("abcdef", request_id="broken-off"):
            break
        gc.collect()
        client.cancel("sentinel")
    broker.expect(p.Submit)
    assert broker.expect(p.Cancel).request_id == "broken-off"
    assert broker.expect(p.Cancel).request_id == "sentinel"


def test_leaving_a_with_block_early_cancels_the_request(make_broker):
    broker = make_broker(hold)
    with Client(broker.addr) as client:
        with client.stream("abcdef", request_id="left") as s:
            next(s)
        assert s.result is None and list(s) == []
        client.cancel("sentinel")
    broker.expect(p.Submit)
    assert broker.expect(p.Cancel).request_id == "left"


def test_errors_and_timeouts_reach_the_caller(make_broker, tmp_path):
    def reject(broker, client_id, msg):
        broker.send(client_id, p.Error(code="invalid_request", message="no", request_id="r1"))

    with Client(make_broker(reject).addr) as client:
        with pytest.raises(RequestRejected, match="invalid_request"):
            client.generate("x", request_id="r1")
    held = make_broker(hold)
    with Client(held.addr, timeout_s=0.2) as client:
        with pytest.raises(RequestTimeout):
            client.generate("x", request_id="t1")
    held.expect(p.Submit)
    assert held.expect(p.Cancel).request_id == "t1"
    with Client(f"ipc://{tmp_path}/nobody", connect_timeout_s=0.2) as client:
        with pytest.raises(Disconnected, match="run.py serve"):
            client.generate("x")


def test_bad_arguments_raise_before_anything_is_sent(make_broker):
    broker = make_broker(echo)
    with Client(broker.addr) as client:
        with pytest.raises(ValueError, match="exactly one"):
            client.generate()
        with pytest.raises(ValueError, match="exactly one"):
            client.stream("a", prompt_ids=[1])
        assert client.generate("ok").text == "OK"
    assert broker.expect(p.Submit).prompt == "ok"


def test_threads_share_one_client(make_broker):
    broker = make_broker(echo)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                results[i * 10 + j] = client.generate(f"t{i}-{j}").text
        except BaseException as exc:
            errors.append(exc)

    with Client(broker.addr) as client:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not errors
    assert results == {i * 10 + j: f"T{i}-{j}" for i in range(8) for j in range(5)}


def test_close_leaves_no_threads_and_refuses_later_calls(make_broker):
    broker = make_broker(echo)
    before = client_threads()
    client = Client(broker.addr)
    assert len(client_threads()) == len(before) + 1
    client.generate("x")
    client.close()
    client.close()
    assert client_threads() == before
    with pytest.raises(ClientClosed):
        client.generate("x")
    with pytest.raises(EngineError):
        client.stream("x")


def test_a_client_dropped_without_close_stops_its_thread(make_broker):
    broker = make_broker(echo)
    before = client_threads()
    client = Client(broker.addr)
    client.generate("x")
    del client
    gc.collect()
    assert client_threads() == before


def test_a_client_that_cannot_connect_leaves_no_thread():
    before = client_threads()
    with pytest.raises(ValueError, match="not an address to connect to"):
        Client("not-an-address")
    assert client_threads() == before
