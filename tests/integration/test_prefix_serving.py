"""Prefix caching end to end: a repeated prompt prefix is found in a worker's cache through the
broker's index, reported in usage.cached_tokens, and changes no greedy token."""

from __future__ import annotations

import pytest

from engine.client import Client

pytestmark = pytest.mark.timeout(180)


def test_a_repeated_prefix_is_served_from_the_cache(scls_engine):
    system = list(range(300, 400))  # 100 tokens: 6 full blocks of 16
    with Client(scls_engine.client_addr, timeout_s=60) as client:
        first = client.generate(prompt_ids=system + [7, 8], max_tokens=12, ignore_eos=True)
        again = client.generate(prompt_ids=system + [7, 8], max_tokens=12, ignore_eos=True)
        other = client.generate(prompt_ids=system + [9] * 20, max_tokens=12, ignore_eos=True)
        stats = client.stats()
    assert first.usage.cached_tokens == 0
    assert again.usage.cached_tokens == 96  # placed where the prefix is, all full blocks reused
    assert again.token_ids == first.token_ids
    assert other.usage.cached_tokens == 96
    assert stats is not None
