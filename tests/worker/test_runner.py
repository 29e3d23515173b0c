"""Runner: batched left-padded forwards equal one-at-a-time forwards; seeded sampling."""

from __future__ import annotations

import torch

from engine.worker.batch_cache import BatchCache, merge
from engine.worker.runner import Runner, SamplingParams, token_seed

from .helpers import make_prompts

GREEDY = SamplingParams()


def greedy_rows(runner: Runner, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    cache = runner.prefill([t[:-1] for t in prompts])
    contexts = [list(t) for t in prompts]
    for _ in range(num_tokens):
        logits = runner.decode(cache, [c[-1] for c in contexts])
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
    out = tiny_loaded.model.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert out[0, len(prompt) :].tolist() == ours


def test_merge_and_select_keep_rows_exact(runner):
    """Rows merged from separate prefills, then some removed, decode as if alone."""
    prompts = make_prompts(3, [9, 33, 5])
    expected = [greedy_rows(runner, [t], 10)[0] for t in prompts]
    parts = [runner.prefill([t[:-1]]) for t in prompts]
    cache = merge(runner.layout, parts, spare_cols=2)
    assert cache.pad_lens == [24, 0, 28] and cache.num_cols == 32
    contexts = [list(t) for t in prompts]
    for step in range(10):
        if step == 4:  # the longest row leaves: leading all-padding columns are trimmed
            cache.select([0, 2])
            assert cache.pad_lens == [0, 4]
            done = contexts.pop(1)
        logits = runner.decode(cache, [c[-1] for c in contexts])
        tokens = runner.sample(logits, [GREEDY] * len(contexts), [0] * len(contexts))
        for c, tok in zip(contexts, tokens, strict=True):
            c.append(tok)
    assert done[len(prompts[1]) :] == expected[1][:4]
    assert contexts[0][len(prompts[0]) :] == expected[0]
    assert contexts[1][len(prompts[2]) :] == expected[2]


def test_padded_kv_is_zero_after_prefill(runner):
    cache = runner.prefill([[5, 6, 7, 8], [9]])
    assert cache.pad_lens == [0, 3]
    for buf in (*cache.keys, *cache.values):
        assert torch.count_nonzero(buf[1, :, :3]) == 0
        assert torch.isfinite(buf).all()


def test_row_kv_roundtrip(runner):
    prompts = make_prompts(4, [12, 30])
    expected = greedy_rows(runner, [prompts[0]], 6)[0]
    cache = runner.prefill([t[:-1] for t in prompts])
    row = BatchCache.from_row(cache.row_kv(0))
    assert row.num_cols == 11 and row.nbytes == 11 * runner.info.kv_bytes_per_token
    context = list(prompts[0])
    for _ in range(6):
        context.append(runner.sample(runner.decode(row, [context[-1]]), [GREEDY], [0])[0])
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
    prompts = make_prompts(5, [4, 19])
    cache = runner.prefill([t[:-1] for t in prompts])
    assert cache.keys[0].dtype == torch.bfloat16
    logits = runner.decode(cache, [t[-1] for t in prompts])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert cache.nbytes == cache.num_rows * cache.capacity * runner.info.kv_bytes_per_token
