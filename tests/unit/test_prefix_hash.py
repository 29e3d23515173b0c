"""Names of KV blocks for prefix caching: equal token blocks after equal prefixes get equal
names; one differing token changes the name of its block and of every later block."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.prefix_hash import block_hashes, chain, prefix_root

ROOT = prefix_root("tiny", "float32", 4)
tokens = st.lists(st.integers(0, 50_000), min_size=0, max_size=64)


@settings(max_examples=200, deadline=None)
@given(a=tokens, b=tokens)
def test_equal_prefixes_get_equal_names(a, b):
    ha, hb = block_hashes(a, 4, ROOT), block_hashes(b, 4, ROOT)
    assert len(ha) == len(a) // 4
    for i in range(min(len(ha), len(hb))):
        assert (ha[i] == hb[i]) == (a[: 4 * (i + 1)] == b[: 4 * (i + 1)])


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(0, 50_000), min_size=4, max_size=64), data=st.data())
def test_one_changed_token_changes_every_later_name(a, data):
    pos = data.draw(st.integers(0, len(a) - 1))
    b = list(a)
    b[pos] = a[pos] + 1
    ha, hb = block_hashes(a, 4, ROOT), block_hashes(b, 4, ROOT)
    for i in range(len(ha)):
        assert (ha[i] == hb[i]) == (i < pos // 4)


def test_known_names_are_extended_not_recomputed():
    toks = list(range(40))
    whole = block_hashes(toks, 4, ROOT)
    assert block_hashes(toks, 4, ROOT, known=whole[:3]) == whole
    assert block_hashes(toks, 4, ROOT, num_blocks=5) == whole[:5]
    assert whole[0] == chain(ROOT, toks[:4])


def test_the_root_separates_models_dtypes_and_block_sizes():
    roots = {
        prefix_root("tiny", "float32", 4),
        prefix_root("tiny", "bfloat16", 4),
        prefix_root("other", "float32", 4),
        prefix_root("tiny", "float32", 16),
    }
    assert len(roots) == 4
    toks = list(range(16))
    assert block_hashes(toks, 4, ROOT)[0] != block_hashes(toks, 4, prefix_root("x", "y", 4))[0]
