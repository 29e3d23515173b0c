"""After a resubmission the broker's stream starts again from the first token (one catch-up
Delta, or the tokens generated anew, whose text may lag its ids): the client passes each token
and character once, and refuses a replay that differs from what had arrived."""

from __future__ import annotations

import pytest

from engine.client.inflight import Diverged, Received
from engine.protocol import Delta


def delta(text: str, ids: list[int]) -> Delta:
    return Delta(request_id="r", text=text, token_ids=ids)


def passed(received: Received, deltas: list[Delta]) -> tuple[str, list[int]]:
    text, ids = "", []
    for d in deltas:
        new = received.take(d)
        if new is not None:
            text, ids = text + new.text, ids + new.token_ids
    return text, ids


def test_a_catch_up_delta_passes_only_what_is_new():
    received = Received()
    assert passed(received, [delta("Hel", [1, 2]), delta("", [3])]) == ("Hel", [1, 2, 3])
    received.replay()
    assert passed(received, [delta("Hello", [1, 2, 3, 4]), delta("!", [5])]) == ("lo!", [4, 5])
    assert (received.text, received.token_ids) == ("Hello!", [1, 2, 3, 4, 5])


def test_a_replay_regenerated_in_other_pieces_passes_each_token_once():
    received = Received()
    before = [delta("ab", [1]), delta("", [2]), delta("cd", [3])]
    assert passed(received, before) == ("abcd", [1, 2, 3])
    received.replay()
    again = [delta("a", [1, 2]), delta("bcde", [3, 4]), delta("", [5]), delta("f", [])]
    assert passed(received, again) == ("ef", [4, 5])
    assert received.take(delta("", [])) is not None  # an empty Delta is passed on as it is


@pytest.mark.parametrize("replayed", [delta("ab", [1, 9]), delta("xb", [1, 2])])
def test_a_replay_that_differs_is_refused(replayed):
    received = Received()
    passed(received, [delta("ab", [1, 2])])
    received.replay()
    with pytest.raises(Diverged):
        received.take(replayed)
