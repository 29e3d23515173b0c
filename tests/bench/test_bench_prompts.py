"""Prompts of an exact token count from the tokenizer, repeatable and distinct."""

from __future__ import annotations

import pytest

from engine.bench.prompts import PromptError, PromptMaker


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_exact_lengths_repeatable_and_distinct(tokenizer):
    maker = PromptMaker(tokenizer, seed=7)
    special = set(tokenizer.all_special_ids)
    for length in (1, 2, 5, 17, 300, 1500):
        ids = maker.make(3, length)
        assert len(ids) == length
        assert not special & set(ids)
        assert all(0 <= t < len(tokenizer) for t in ids)
    assert PromptMaker(tokenizer, seed=7).make(3, 64) == maker.make(3, 64)
    assert maker.make(4, 64)[:8] != maker.make(3, 64)[:8]  # the header differs per request
    assert maker.make(3, 64) != PromptMaker(tokenizer, seed=8).make(3, 64)
    assert maker.decode(maker.make(3, 12)).startswith("Request 3")


def test_base_ids_are_cut_or_extended(tokenizer):
    maker = PromptMaker(tokenizer, seed=0)
    assert maker.make(0, 3, base_ids=[5, 6, 7, 8]) == [5, 6, 7]
    longer = maker.make(0, 10, base_ids=[5, 6])
    assert longer[:2] == [5, 6] and len(longer) == 10
    with pytest.raises(PromptError, match="at least 1 token"):
        maker.make(0, 0)


def test_tokenizer_without_text_is_refused():
    class Empty:
        all_special_ids: list[int] = []

        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(PromptError, match="plain English text"):
        PromptMaker(Empty())
