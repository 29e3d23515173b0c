"""End to end with the embedded SmolLM2 (slow): conversion cache, chat template, exact batching.

Uses the real cache directory (~/.cache/scls-engine or $XDG_CACHE_HOME): the first run converts
the GGUF file once (about 30 s here), later runs load the converted weights in about a second.
"""

from __future__ import annotations

import pytest

from engine.models import load_tokenizer, resolve_model
from engine.worker.executor import Executor
from engine.worker.model_loader import load_model
from engine.worker.runner import Runner

from .helpers import BIG_BUDGET, drain, generate_sliced, make_item, make_run

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three colours, then explain in detail why the sky looks blue during the day.",
]


@pytest.fixture(scope="module")
def smollm2():
    spec = resolve_model("embedded")
    loaded = load_model(spec)
    assert resolve_model("embedded").model_dir is not None  # converted and cached
    return Runner(loaded), load_tokenizer(spec)


def chat_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def test_smollm2_answers_paris_and_batching_changes_nothing(smollm2):
    runner, tokenizer = smollm2
    assert runner.info.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in runner.info.eos_token_ids
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    executor = Executor(runner, BIG_BUDGET)
    executor.submit(make_run(1, [make_item("paris", prompts[0], max_steps=24, ignore_eos=False)]))
    alone = drain(executor).tokens["paris"]
    answer = tokenizer.decode(alone, skip_special_tokens=True)
    assert "Paris" in answer, answer

    items = [make_item(f"q{i}", t, max_steps=24, ignore_eos=False) for i, t in enumerate(prompts)]
    executor.submit(make_run(2, items))
    batched = drain(executor)
    assert batched.tokens["q0"] == alone
    assert batched.done[2].pad_tokens == 0  # prompts of different lengths, none padded


def test_smollm2_slices_with_kept_or_recomputed_kv_equal_one_dispatch(smollm2):
    runner, tokenizer = smollm2
    prompts = {f"q{i}": chat_ids(tokenizer, q) for i, q in enumerate(QUESTIONS)}
    whole = generate_sliced(Executor(runner, BIG_BUDGET), prompts, 32, 32, keep_kv=False)
    kept = generate_sliced(Executor(runner, BIG_BUDGET), prompts, 32, 8, keep_kv=True)
    recomputed = generate_sliced(Executor(runner, BIG_BUDGET), prompts, 32, 8, keep_kv=False)
    assert kept == whole and recomputed == whole


def test_smollm2_prefix_cache_hit_changes_no_token(smollm2):
    """Two chats that share a long system prompt: the second reuses its blocks (and a follow-up
    turn reuses the first chat's whole history) with the same greedy tokens as without."""
    runner, tokenizer = smollm2
    system = "You are a careful assistant. " * 12

    def ids(*turns: str) -> list[int]:
        roles = ["user", "assistant"]
        messages = [{"role": "system", "content": system}] + [
            {"role": roles[i % 2], "content": t} for i, t in enumerate(turns)
        ]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False
        )

    first = ids(QUESTIONS[0])
    cached, plain = Executor(runner, BIG_BUDGET), Executor(runner, BIG_BUDGET, prefix_cache=False)
    answers = {}
    for n, prompt in enumerate([first, ids(QUESTIONS[1])]):
        item = make_item(f"c{n}", prompt, max_steps=16, ignore_eos=False)
        cached.submit(make_run(n + 1, [item]))
        with_cache = drain(cached)
        plain.submit(make_run(n + 1, [item]))
        assert with_cache.tokens == drain(plain).tokens
        answers[n] = with_cache
    assert answers[0].done[1].prefix_hit_tokens == 0
    system_len = len(tokenizer(system)["input_ids"])
    assert answers[1].done[2].prefix_hit_tokens >= 16 * (system_len // 16)
    answer = tokenizer.decode(answers[0].tokens["c0"], skip_special_tokens=True)
    follow = ids(QUESTIONS[0], answer, QUESTIONS[2])
    item = make_item("c2", follow, max_steps=8, ignore_eos=False)
    cached.submit(make_run(3, [item]))
    plain.submit(make_run(3, [item]))
    again, reference = drain(cached), drain(plain)
    assert again.tokens == reference.tokens
    assert again.done[3].prefix_hit_tokens >= 16 * (len(first) // 16)
