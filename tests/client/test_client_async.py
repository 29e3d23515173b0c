"""AsyncClient against a scripted ROUTER peer: routing, streams, errors, timeouts, cancels."""

from __future__ import annotations

import asyncio
import gc

import pytest
from scripted_broker import completion, deltas, echo, finished, hold, prompt_tokens, run

from engine import protocol as p
from engine.client import (
    AsyncClient,
    ClientClosed,
    Disconnected,
    RequestRejected,
    RequestTimeout,
)


def test_generate_returns_the_finished_result(make_broker):
    broker = make_broker(echo)

    async def main():
        async with AsyncClient(broker.addr) as client:
            return await client.generate("hello", max_tokens=3, seed=7, stop=["\n"])

    result = run(main())
    submit = broker.expect(p.Submit)
    assert submit.prompt == "hello" and submit.seed == 7 and submit.stop == ["\n"]
    assert not submit.stream
    assert len(submit.request_id) == 32 and result.request_id == submit.request_id  # uuid4 hex
    assert (result.text, result.token_ids, result.finish_reason) == ("HEL", [72, 69, 76], "length")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 3)
    assert result.timings.first_token_s == 0.002 and result.num_slices == 1


def test_prompt_ids_chat_and_a_given_request_id_reach_the_broker(make_broker):
    broker = make_broker(echo)

    async def main():
        async with AsyncClient(broker.addr) as client:
            by_ids = await client.generate(prompt_ids=[104, 105], request_id="mine")
            by_chat = await client.chat([{"role": "user", "content": "yo"}], max_tokens=5)
            return by_ids, by_chat

    by_ids, by_chat = run(main())
    assert by_ids.request_id == "mine" and by_ids.text == "HI"
    assert broker.expect(p.Submit).prompt_ids == [104, 105]
    assert broker.expect(p.Submit).messages == [p.ChatMessage(role="user", content="yo")]
    assert by_chat.text == "YO"


def test_a_stream_reassembles_to_the_final_result(make_broker):
    broker = make_broker(echo)

    async def main():
        async with AsyncClient(broker.addr) as client:
            async with client.stream("hello world", max_tokens=100) as s:
                got = [d async for d in s]
            return s, got

    s, got = run(main())
    assert broker.expect(p.Submit).stream
    assert [len(d.token_ids) for d in got] == [2, 2, 2, 2, 2, 1]
    assert "".join(d.text for d in got) == s.result.text == s.text == "HELLO WORLD"
    assert [t for d in got for t in d.token_ids] == s.result.token_ids == s.token_ids
    assert s.prompt_tokens == 11 and s.result.finish_reason == "stop"


def test_a_stream_also_works_without_async_with(make_broker):
    broker = make_broker(echo)

    async def main():
        async with AsyncClient(broker.addr) as client:
            s = client.stream("abc")
            return s, [d.text async for d in s]

    s, texts = run(main())
    assert texts == ["AB", "C"] and s.result.text == "ABC" and s.closed


def interleave(n: int):
    """Waits for n streaming submits, then answers them delta by delta, round robin, and
    finishes them in reverse order."""

    def handler(broker, client_id, msg):
        if not isinstance(msg, p.Submit):
            return
        broker.send(client_id, p.Accepted(request_id=msg.request_id, prompt_tokens=1))
        pending = broker.state.setdefault("pending", [])
        pending.append(msg)
        if len(pending) < n:
            return
        streams = {m.request_id: deltas(m, completion(m), per_delta=1) for m in pending}
        while any(streams.values()):
            for queue in streams.values():
                if queue:
                    broker.send(client_id, queue.pop(0))
        for m in reversed(pending):
            broker.send(client_id, finished(m, completion(m), "stop"))

    return handler


def test_interleaved_replies_of_concurrent_requests_reach_their_own_stream(make_broker):
    prompts = ["alpha", "bravo charlie", "d", "echo foxtrot golf", "hotel"]
    broker = make_broker(interleave(len(prompts)))

    async def one(client, prompt):
        async with client.stream(prompt) as s:
            return "".join([d.text async for d in s]), s.result

    async def main():
        async with AsyncClient(broker.addr) as client:
            return await asyncio.gather(*(one(client, q) for q in prompts))

    for prompt, (text, result) in zip(prompts, run(main()), strict=True):
        assert text == result.text == prompt.upper()


def test_concurrent_generate_calls_on_one_client(make_broker):
    broker = make_broker(echo)

    async def main():
        async with AsyncClient(broker.addr) as client:
            return await asyncio.gather(*(client.generate(f"p{i}") for i in range(50)))

    assert [r.text for r in run(main())] == [f"P{i}" for i in range(50)]


def reject(code: str, after_deltas: bool = False):
    def handler(broker, client_id, msg):
        if isinstance(msg, p.Submit):
            error = p.Error(code=code, message="change something", request_id=msg.request_id)
            if after_deltas:
                broker.send(client_id, p.Accepted(request_id=msg.request_id, prompt_tokens=1))
                broker.send(client_id, deltas(msg, completion(msg))[0])
            broker.send(client_id, error)

    return handler


def test_an_error_reply_raises_request_rejected(make_broker):
    broker = make_broker(reject("prompt_too_long"))

    async def main():
        async with AsyncClient(broker.addr) as client:
            with pytest.raises(RequestRejected) as info:
                await client.generate("x" * 10, request_id="long")
            return info.value

    error = run(main())
    assert (error.code, error.message, error.request_id) == (
        "prompt_too_long",
        "change something",
        "long",
    )
    assert not error.retryable
    assert "prompt_too_long" in str(error) and "'long'" in str(error)


def test_an_error_after_some_deltas_ends_the_stream_with_request_rejected(make_broker):
    broker = make_broker(reject("internal", after_deltas=True))

    async def main():
        async with AsyncClient(broker.addr) as client:
            s = client.stream("abcdef")
            got = []
            with pytest.raises(RequestRejected) as info:
                async for d in s:
                    got.append(d.text)
            return got, info.value, s

    got, error, s = run(main())
    assert got == ["AB"] and error.code == "internal" and s.result is None and s.text == "AB"


def test_no_workers_is_retryable(make_broker):
    broker = make_broker(reject("no_workers"))

    async def main():
        async with AsyncClient(broker.addr) as client:
            with pytest.raises(RequestRejected) as info:
                await client.generate("x")
            return info.value

    assert run(main()).retryable


def test_a_timeout_raises_request_timeout_and_cancels_the_request(make_broker):
    broker = make_broker(hold)

    async def main():
        async with AsyncClient(broker.addr) as client:
            with pytest.raises(RequestTimeout) as info:
                await client.generate("slow", request_id="slow-1", timeout_s=0.3)
            return info.value

    error = run(main())
    assert error.request_id == "slow-1" and error.timeout_s == 0.3
    assert "slow-1" in str(error) and "0.3" in str(error) and isinstance(error, TimeoutError)
    broker.expect(p.Submit)
    assert broker.expect(p.Cancel).request_id == "slow-1"


def test_the_client_default_timeout_applies_to_streams(make_broker):
    broker = make_broker(hold)

    async def main():
        async with AsyncClient(broker.addr, timeout_s=1.0) as client:
            s = client.stream("slow")
            got = []
            with pytest.raises(RequestTimeout) as info:
                async for d in s:
                    got.append(d)
            return got, info.value

    got, error = run(main())
    assert len(got) == 2 and error.num_received_tokens == 4
    submit = broker.expect(p.Submit)
    assert broker.expect(p.Cancel).request_id == submit.request_id


def test_nothing_listening_raises_disconnected_naming_the_address(tmp_path):
    addr = f"ipc://{tmp_path}/nobody-here"

    async def main():
        async with AsyncClient(addr, connect_timeout_s=0.3) as client:
            with pytest.raises(Disconnected) as info:
                await client.generate("x")
            with pytest.raises(Disconnected):
                await client.stats()
            return info.value

    error = run(main())
    assert error.addr == addr and addr in str(error) and "run.py serve" in str(error)
    assert isinstance(error, ConnectionError)


def test_a_peer_that_never_answers_raises_disconnected_asking_for_the_right_address(make_broker):
    broker = make_broker(lambda *_: None)

    async def main():
        async with AsyncClient(broker.addr, connect_timeout_s=1.0) as client:
            with pytest.raises(Disconnected) as info:
                await client.generate("x")
            return info.value

    error = run(main())
    assert "did not answer" in str(error) and "connect_timeout_s" in str(error)


def vanish(broker, client_id, msg):
    if isinstance(msg, p.Submit):
        broker.send(client_id, p.Accepted(request_id=msg.request_id, prompt_tokens=1))
        broker.close_socket()


def test_a_broker_that_dies_mid_request_raises_disconnected_at_once(make_broker):
    broker = make_broker(vanish)

    async def main():  # resume_timeout_s=None: no waiting for it to come back (see reliability)
        async with AsyncClient(broker.addr, timeout_s=15, resume_timeout_s=None) as client:
            with pytest.raises(Disconnected) as info:
                await client.generate("x", request_id="lost-1")
            return info.value

    error = run(main(), timeout_s=10)  # heartbeats would take 5 s; the monitor is immediate
    assert error.request_id == "lost-1" and "lost the connection" in str(error)


def test_leaving_a_stream_early_cancels_the_request(make_broker):
    broker = make_broker(hold)

    async def main():
        async with AsyncClient(broker.addr) as client:
            async with client.stream("abcdef", request_id="early") as s:
                async for _ in s:
                    break
            assert s.result is None
            return await client.generate("ok", max_tokens=1, timeout_s=0.2)

    with pytest.raises(RequestTimeout):  # hold never finishes: the second call just times out
        run(main())
    assert broker.expect(p.Submit).request_id == "early"
    assert broker.expect(p.Cancel).request_id == "early"


def test_dropping_a_stream_without_closing_it_cancels_the_request(make_broker):
    broker = make_broker(hold)

    async def main():
        async with AsyncClient(broker.addr) as client:
            async for _ in client.stream("abcdef", request_id="dropped"):
                break
            gc.collect()
            await client.cancel("sentinel")  # sent after the Cancel queued by the drop

    run(main())
    broker.expect(p.Submit)
    assert broker.expect(p.Cancel).request_id == "dropped"
    assert broker.expect(p.Cancel).request_id == "sentinel"


def test_cancel_ends_a_stream_with_finish_reason_cancelled(make_broker):
    broker = make_broker(hold)

    async def main():
        async with AsyncClient(broker.addr) as client:
            async with client.stream("abcdef", request_id="c1") as s:
                first = await s.__anext__()
                await client.cancel("c1")
                rest = [d async for d in s]
            return first, rest, s.result

    first, rest, result = run(main())
    assert first.text == "AB" and [d.text for d in rest] == ["CD"]
    assert result.finish_reason == "cancelled" and result.text == "ABCD"


def test_an_error_without_request_id_fails_the_oldest_unaccepted_request(make_broker):
    def unparsable(broker, client_id, msg):
        if isinstance(msg, p.Submit):
            broker.send(client_id, p.Error(code="invalid_request", message="bad frame"))

    broker = make_broker(unparsable)

    async def main():
        async with AsyncClient(broker.addr) as client:
            with pytest.raises(RequestRejected) as info:
                await client.generate("x", request_id="r9")
            return info.value

    error = run(main())
    assert (error.code, error.request_id) == ("invalid_request", "r9")


def test_stray_and_garbage_replies_are_dropped_and_the_client_goes_on(make_broker):
    def noisy(broker, client_id, msg):
        broker.send_raw(client_id, b"\xc1 not msgpack")
        broker.send(client_id, p.Delta(request_id="someone-else", text="?", token_ids=[1]))
        broker.send(client_id, p.Error(code="unknown_request", message="?", request_id="old"))
        echo(broker, client_id, msg)

    broker = make_broker(noisy)

    async def main():
        async with AsyncClient(broker.addr) as client:
            return await client.generate("fine")

    assert run(main()).text == "FINE"


def test_a_request_id_already_in_flight_is_refused_locally(make_broker):
    broker = make_broker(hold)

    async def main():
        async with AsyncClient(broker.addr) as client:
            async with client.stream("abc", request_id="same"):
                with pytest.raises(ValueError, match="already in flight") as info:
                    await client.generate("abc", request_id="same")
                assert info.value.code == "duplicate_request_id"

    run(main())


def test_stats_returns_snapshots_also_concurrently(make_broker):
    broker = make_broker(echo)

    async def main():
        async with AsyncClient(broker.addr) as client:
            return await asyncio.gather(*(client.stats() for _ in range(5)))

    snapshots = run(main())
    assert [s.num_running for s in snapshots] == [3] * 5
    assert all(isinstance(s, p.StatsSnapshot) for s in snapshots)


def test_close_fails_waiting_requests_and_later_calls(make_broker):
    broker = make_broker(hold)

    async def main():
        client = AsyncClient(broker.addr)
        task = asyncio.ensure_future(client.generate("abc"))
        await asyncio.to_thread(broker.expect, p.Submit)  # the request is in flight
        await client.close()
        with pytest.raises(ClientClosed):
            await task
        with pytest.raises(ClientClosed):
            await client.generate("abc")
        await client.close()  # twice is fine

    run(main())


def test_the_fake_tokenizer_of_the_scripted_broker():
    assert prompt_tokens(p.Submit(prompt="ab")) == [97, 98]
