"""What docs/PROTOCOL.md promises where it and the server once disagreed: each decision, as the
core (and the checks before it) carry it out."""

from __future__ import annotations

import pytest
from test_core import drain, make_core, ready, run_batch

from engine import protocol as p
from engine.broker.validation import check_prompt_fields
from engine.errors import SubmitError


def submit(core, client: bytes, request_id: str, now: float = 0.0, **fields) -> None:
    msg = p.Submit(request_id=request_id, prompt_ids=[1, 2], **{"max_tokens": 4, **fields})
    core.submit(client, msg, [1, 2], now)


def finish_all(core, now: float = 1.0) -> list[tuple[bytes, object]]:
    """Run every request to its end; the replies sent meanwhile."""
    out = []
    for _ in range(5):
        core.schedule(now)
        clients, to_workers = drain(core)
        out += [(c.client_id, c.msg) for c in clients]
        for run in [w.msg for w in to_workers if isinstance(w.msg, p.RunBatch)]:
            run_batch(core, core.workers["w1"], run, now)
        now += 1.0
    return out + replies(core)


def replies(core) -> list[tuple[bytes, object]]:
    clients, _ = drain(core)
    return [(c.client_id, c.msg) for c in clients]


def test_an_empty_stop_string_is_refused():
    core = make_core()
    submit(core, b"c", "r", stop=["ok", ""])
    [(_, error)] = replies(core)
    assert error.code == "invalid_request" and "stop[1] is empty" in error.message
    assert not core.requests


def test_an_empty_request_id_is_refused_not_taken_for_none():
    with pytest.raises(SubmitError, match="request_id is empty") as info:
        check_prompt_fields(p.Submit(request_id="", prompt="hi"))
    assert info.value.code == "invalid_request"
    check_prompt_fields(p.Submit(prompt="hi"))  # left out: the broker assigns one


def test_a_chat_role_the_templates_do_not_know_is_refused_before_tokenizing():
    """A typo in a role would otherwise reach the chat template as text, silently."""
    wizard = [p.ChatMessage(role="user", content="hi"), p.ChatMessage(role="wizard", content="x")]
    with pytest.raises(SubmitError, match=r"messages\[1\].role is 'wizard': use one of") as info:
        check_prompt_fields(p.Submit(messages=wizard))
    assert info.value.code == "invalid_request"
    for role in p.CHAT_ROLES:
        check_prompt_fields(p.Submit(messages=[p.ChatMessage(role=role, content="hi")]))


def test_an_infinite_temperature_is_refused():
    core = make_core()
    submit(core, b"c", "r", temperature=float("inf"))
    [(_, error)] = replies(core)
    assert error.code == "invalid_request" and "finite number" in error.message


def test_a_duplicate_id_refuses_the_new_submit_and_the_live_request_goes_on():
    core = make_core()
    core.add_worker(b"w", ready(), 0.0)
    submit(core, b"c", "r")
    submit(core, b"c", "r", temperature=0.5)  # the same id, another request
    accepted, error = [m for _, m in replies(core)]
    assert isinstance(accepted, p.Accepted) and error.code == "duplicate_request_id"
    assert error.request_id == "r"  # it names the id; the live request is not ended by it
    assert [type(m) for _, m in finish_all(core)] == [p.Finished]


def test_a_takeover_ends_the_first_connection_with_resumed_elsewhere():
    core = make_core()
    core.add_worker(b"w", ready(), 0.0)
    submit(core, b"first", "r")
    drain(core)
    submit(core, b"second", "r")
    out = replies(core)
    assert [(c, type(m)) for c, m in out] == [(b"first", p.Error), (b"second", p.Accepted)]
    assert out[0][1].code == "resumed_elsewhere" and out[1][1].resumed
    assert [(c, type(m)) for c, m in finish_all(core)] == [(b"second", p.Finished)]


def test_the_same_submit_after_it_finished_gets_the_same_answer_on_any_connection():
    core = make_core()
    core.add_worker(b"w", ready(), 0.0)
    submit(core, b"c", "r")
    first = [m for _, m in finish_all(core) if isinstance(m, p.Finished)][0]
    for client in (b"c", b"other"):  # the same connection too: an idempotency key
        submit(core, client, "r", now=9.0)
        accepted, again = [m for _, m in replies(core)]
        assert accepted.resumed and again == first
    submit(core, b"c", "r", now=9.0, max_tokens=3)  # another request: a new generation
    accepted = [m for _, m in replies(core)][0]
    assert isinstance(accepted, p.Accepted) and not accepted.resumed
