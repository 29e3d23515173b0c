"""The broker's prefix index: per worker, the names its BlockEvents announced; per request, the
leading tokens each worker holds, hashed once per root and looked up only when read."""

from __future__ import annotations

import random

from engine.broker.prefix_index import PrefixIndex
from engine.prefix_hash import block_hashes, prefix_root

ROOT = prefix_root("m", "float32", 4)
OTHER = prefix_root("other", "float32", 4)


def test_leading_blocks_per_worker_from_events():
    index = PrefixIndex()
    index.add_worker("a", ROOT, 4)
    index.add_worker("b", ROOT, 4)
    index.add_worker("c", b"", 4)  # no prefix cache: never indexed
    tokens = list(range(13))  # 12 tokens of context: 3 full blocks
    names = block_hashes(tokens, 4, ROOT)
    assert not index.active and index.cached_tokens(tokens, {}) == {}
    index.apply("a", names[:2], [])
    index.apply("b", [names[0], names[2]], [])
    index.apply("c", names, [])
    assert index.cached_tokens(tokens, {}) == {"a": 8, "b": 4}  # b's chain breaks at block 1
    index.apply("a", [], [names[0]])
    assert index.cached_tokens(tokens, {}) == {"b": 4}
    index.add_worker("b", ROOT, 4)  # announced again (a reset): it holds nothing now
    assert index.cached_tokens(tokens, {}) == {}
    index.remove_worker("a")
    assert index.num_blocks("a") == 0 and not index.active


def test_names_are_memoised_per_root_and_lookups_wait_until_read():
    index = PrefixIndex()
    index.add_worker("a", ROOT, 4)
    index.add_worker("z", OTHER, 4)  # another model: its own names
    tokens = list(range(9))
    index.apply("a", block_hashes(tokens, 4, ROOT), [])
    index.apply("z", block_hashes(tokens, 4, OTHER), [])
    memo: dict = {}
    calls = []

    def context():
        calls.append(1)
        return tokens

    lazy = index.lazy_cached_tokens(context, memo)
    assert calls == []  # nothing computed until a policy reads it
    assert dict(lazy) == {"a": 8, "z": 8} and len(calls) == 1
    assert lazy.get("a") == 8 and len(calls) == 1
    assert set(memo) == {ROOT, OTHER} and len(memo[ROOT].names) == 2


def test_the_inverted_index_answers_as_reading_every_worker_would():
    """Random events on workers of two roots, joins and leaves: a request's cached tokens per
    worker are always its leading blocks that worker announced, counted worker by worker."""
    rng = random.Random(7)
    roots = {"a": ROOT, "b": ROOT, "c": ROOT, "y": OTHER, "z": OTHER}
    index, held = PrefixIndex(), {w: set() for w in roots}
    order = list(roots)  # the order workers joined in: a worker announced again goes last
    for w, root in roots.items():
        index.add_worker(w, root, 4)
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    for _ in range(400):
        w = rng.choice(sorted(roots))
        if rng.random() < 0.03:  # announced again: it holds nothing now
            index.add_worker(w, roots[w], 4)
            held[w] = set()
            order.remove(w)
            order.append(w)
            continue
        names = block_hashes(rng.choice(prompts), 4, roots[w])
        stored = rng.sample(names, rng.randrange(len(names) + 1))
        removed = rng.sample(sorted(held[w]), min(len(held[w]), rng.randrange(3)))
        index.apply(w, stored, removed)
        held[w] = (held[w] - set(removed)) | set(stored)
        tokens = rng.choice(prompts)
        expected = {}
        for worker in order:
            n = 0
            for name in block_hashes(tokens, 4, roots[worker], (len(tokens) - 1) // 4):
                if name not in held[worker]:
                    break
                n += 1
            if n:
                expected[worker] = 4 * n
        assert index.cached_tokens(tokens, {}) == expected
        assert list(index.cached_tokens(tokens, {})) == list(expected)  # in the workers' order
        assert index.active == any(held.values())
