"""Runner: ragged forwards over the paged pool equal one-at-a-time forwards; seeded sampling."""

from __future__ import annotations

import torch

from engine.worker.kv_pool import BlockTable, KVPool
from engine.worker.paged_attention import ATTN_IMPLEMENTATION
from engine.worker.runner import Runner, SamplingParams, token_seed

from .helpers import make_prompts

GREEDY = SamplingParams()
BUDGET = 8 << 20  # bytes of KV pool in these tests


def greedy_rows(
    runner: Runner, prompts: list[list[int]], num_tokens: int, pool: KVPool | None = None
) -> list[list[int]]:
    """Prefill every prompt (but its last token) in one ragged forward, then decode them
    together; returns each row's generated tokens."""
    pool = pool or runner.new_pool(BUDGET)
    tables = [BlockTable() for _ in prompts]
    for table, t in zip(tables, prompts, strict=True):
        assert pool.allocate(table, len(t) - 1 + num_tokens)
    prefill = [(tb, t[:-1]) for tb, t in zip(tables, prompts, strict=True) if len(t) > 1]
    if prefill:
        runner.forward(pool, prefill)
    contexts = [list(t) for t in prompts]
    for _ in range(num_tokens):
        logits = runner.forward(
            pool, [(tb, [c[-1]]) for tb, c in zip(tables, contexts, strict=True)]
        )
        for context, token in zip(
            contexts,
            runner.sample(logits, [GREEDY] * len(contexts), [0] * len(contexts)),
            strict=True,
        ):
            context.append(token)
    return [c[len(t) :] for c, t in zip(contexts, prompts, strict=True)]


def test_batched_prefill_and_decode_equal_single_rows(runner):
    prompts = make_prompts(1, [3, 17, 60, 1])
    batched = greedy_rows(runner, prompts, 24)
    assert batched == [greedy_rows(runner, [t], 24)[0] for t in prompts]


def test_single_row_matches_transformers_generate(runner, tiny_loaded):
    prompt = make_prompts(2, [21])[0]
    ours = greedy_rows(runner, [prompt], 16)[0]
    runner.model.set_attn_implementation("sdpa")
    try:
        out = tiny_loaded.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    finally:
        runner.model.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert out[0, len(prompt) :].tolist() == ours


def test_scattered_blocks_decode_like_consecutive_ones(runner):
    """A table spread over blocks that are not consecutive (attention gathers it) gives the
    same tokens as one run of consecutive blocks (attention reads a view)."""
    prompt = make_prompts(3, [40])[0]
    expected = greedy_rows(runner, [prompt], 12)[0]
    pool = runner.new_pool(32 * 4 * runner.info.kv_bytes_per_token, block_tokens=4)
    holes = [BlockTable() for _ in range(32)]
    for h in holes:
        assert pool.allocate(h, 4)  # one block each: 0, 1, ..., 31
    for h in holes[::2]:
        pool.free(h)  # blocks 0, 2, 4, ... are free: no two consecutive
    probe = BlockTable()
    assert pool.allocate(probe, 8) and len(probe.runs(4, 8)) == 2  # scattered
    pool.free(probe)
    assert greedy_rows(runner, [prompt], 12, pool=pool)[0] == expected


def test_prefill_after_a_cached_prefix_equals_one_prefill(runner):
    """New tokens after KV already in the table attend causally to prefix and themselves."""
    prompt = make_prompts(4, [30])[0]
    pool = runner.new_pool(BUDGET)
    whole, split = BlockTable(), BlockTable()
    assert pool.allocate(whole, 30) and pool.allocate(split, 30)
    a = runner.forward(pool, [(whole, prompt)])
    runner.forward(pool, [(split, prompt[:11])])
    b = runner.forward(pool, [(split, prompt[11:])])
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert torch.allclose(a, b, atol=1e-4)


def test_read_write_roundtrip(runner):
    """KV read out of the pool and written into fresh blocks decodes on as if never moved."""
    prompts = make_prompts(5, [12, 30])
    expected = greedy_rows(runner, [prompts[0]], 6)[0]
    pool = runner.new_pool(BUDGET)
    tables = [BlockTable(), BlockTable()]
    for tb, t in zip(tables, prompts, strict=True):
        assert pool.allocate(tb, len(t) - 1)
    runner.forward(pool, [(tb, t[:-1]) for tb, t in zip(tables, prompts, strict=True)])
    layers = pool.read(tables[0])
    assert layers[0][0].shape[-2] == 11
    pool.free(tables[0])
    moved = BlockTable()
    assert pool.allocate(moved, 11 + 6)
    pool.write(moved, layers)
    context = list(prompts[0])
    for _ in range(6):
        logits = runner.forward(pool, [(moved, [context[-1]])])
        context.append(runner.sample(logits, [GREEDY], [0])[0])
    assert context[12:] == expected


def test_sampling_is_seeded_per_token_index(runner):
    row = torch.randn(1, runner.info.vocab_size, generator=torch.Generator().manual_seed(0))
    logits = row.expand(3, -1)  # the same logits in every row
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = runner.sample(logits, [params] * 3, [5, 5, 6])
    again = runner.sample(logits, [params] * 3, [5, 5, 6])
    assert first == again and first[0] == first[1]
    assert token_seed(7, 5) != token_seed(7, 6) != token_seed(8, 5)


def test_top_k_one_is_greedy(runner):
    logits = torch.randn(4, runner.info.vocab_size, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.7, top_k=1, seed=s) for s in range(4)]
    assert runner.sample(logits, params, [0] * 4) == logits.argmax(-1).tolist()


def test_top_p_keeps_the_nucleus(runner):
    logits = torch.full((1, runner.info.vocab_size), -30.0)
    logits[0, 10], logits[0, 11] = 5.0, 4.0  # ~0.73 and ~0.27 of the mass
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=None)
    assert {runner.sample(logits, [params], [i])[0] for i in range(20)} == {10}


def test_bfloat16_runs_with_finite_logits(tiny_model_dir):
    from engine.worker.model_loader import load_model

    runner = Runner(load_model(str(tiny_model_dir), dtype="bfloat16"))
    pool = runner.new_pool(BUDGET)
    assert pool.keys[0].dtype == torch.bfloat16
    assert pool.block_bytes == pool.block_tokens * runner.info.kv_bytes_per_token
    prompts = make_prompts(5, [4, 19])
    tables = [BlockTable(), BlockTable()]
    for tb, t in zip(tables, prompts, strict=True):
        assert pool.allocate(tb, len(t))
    runner.forward(pool, [(tb, t[:-1]) for tb, t in zip(tables, prompts, strict=True)])
    logits = runner.forward(pool, [(tb, [t[-1]]) for tb, t in zip(tables, prompts, strict=True)])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
