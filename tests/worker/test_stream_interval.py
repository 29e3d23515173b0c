"""--stream-interval: the executor sends sampled tokens every few steps rather than every step;
the tokens are the same, a request's first token is not held back, and a request's tokens
always go out before (or with) its release."""

from __future__ import annotations

import pytest

from engine import protocol as p
from engine.worker.executor import Executor
from worker.helpers import BIG_BUDGET, make_item, make_prompts, make_run


def serve(runner, interval: int) -> tuple[dict[str, list[int]], list[list], dict[str, int]]:
    """Three requests of unlike lengths joined at once, one joining later; the tokens, each
    step's Generated (request ids, in order) and the step each request was released at."""
    executor = Executor(runner, BIG_BUDGET, stream_interval=interval)
    a, b, c, d = make_prompts(7, [9, 30, 14, 5])
    executor.submit(make_run(1, [
        make_item("a", a, max_steps=5, max_new_tokens=5),
        make_item("b", b, max_steps=11, max_new_tokens=11),
        make_item("c", c, max_steps=8, max_new_tokens=20, keep_kv=True),
    ], join=True))  # fmt: skip
    tokens: dict[str, list[int]] = {}
    steps: list[list] = []
    released: dict[str, int] = {}
    step = 0
    while executor.has_work():
        if step == 3:
            executor.submit(make_run(2, [make_item("d", d, max_steps=6, max_new_tokens=6)], True))
        result = executor.step()
        sent = result.generated.tokens if result.generated is not None else []
        steps.append([rid for rid, _ in sent])
        for rid, toks in sent:
            tokens.setdefault(rid, []).extend(toks)
        for msg in result.released:
            assert len(tokens.get(msg.request_id, [])) == msg.num_generated, msg  # none held
            released[msg.request_id] = step
        step += 1
    return tokens, steps, released


@pytest.mark.parametrize("interval", [3, 8])
def test_tokens_are_the_same_and_go_out_every_interval(runner, interval: int) -> None:
    every_step, per_step, released_at = serve(runner, 1)
    tokens, steps, released = serve(runner, interval)
    assert tokens == every_step and released == released_at
    assert sum(1 for s in steps if s) < sum(1 for s in per_step if s)
    # each request's first token goes out in the step that sampled it
    first_seen = {rid: next(i for i, s in enumerate(per_step) if rid in s) for rid in tokens}
    assert all(rid in steps[i] for rid, i in first_seen.items())
    # between sends, at most interval - 1 steps pass while requests run
    sent_at = [i for i, s in enumerate(steps) if s]
    assert all(b - a <= interval for a, b in zip(sent_at, sent_at[1:], strict=False))


def test_an_interval_below_one_is_refused(runner) -> None:
    with pytest.raises(ValueError, match="at least 1 step"):
        Executor(runner, BIG_BUDGET, stream_interval=0)


def test_a_ready_without_it_means_every_step() -> None:
    """An older worker's Ready (no stream_interval at its end) decodes as interval 1."""
    import msgspec

    ready = p.Ready(
        version=p.PROTOCOL_VERSION, worker_id="w", device="cpu", model="m", dtype="float32",
        kv_bytes_per_token=8, kv_budget_bytes=1 << 20, max_context_len=64, eos_token_ids=[0],
        mem_total_bytes=None, time_model=None, stream_interval=4,
    )  # fmt: skip
    fields = msgspec.msgpack.decode(p.encode(ready))
    assert p.decode_from_worker(p.encode(ready)).stream_interval == 4
    older = p.decode_from_worker(msgspec.msgpack.encode(fields[:-1]))
    assert older.stream_interval == 1 and older.worker_id == "w"
