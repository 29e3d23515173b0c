"""Workloads that share prefixes: Mooncake's hash_ids become equal token blocks (scaled with the
divisors), synthetic system prompts and multi-turn conversations, the ideal hit rate an infinite
cache would reach, and the measured hit rate."""

from __future__ import annotations

import json

import pytest

from engine.bench import metrics
from engine.bench.prefix_stats import WORKER_BLOCK_TOKENS, ideal_prefix_hits
from engine.bench.prompts import PromptMaker
from engine.bench.records import RequestRecord, RunResult
from engine.bench.workloads import LengthScaling, WorkloadError, load_workload, scale_workload
from engine.worker.kv_pool import DEFAULT_BLOCK_TOKENS


@pytest.fixture(scope="module")
def maker(tiny_model_dir):
    from transformers import AutoTokenizer

    return PromptMaker(AutoTokenizer.from_pretrained(tiny_model_dir), seed=3)


def prompts_of(workload, maker):
    return [maker.make(r.index, r.prompt_len, r.prompt_ids, r.segments) for r in workload.requests]


def test_mooncake_hash_ids_become_equal_blocks_scaled_by_the_divisor(tmp_path, maker):
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [0, 1, 2]},
        {"timestamp": 5, "input_length": 1024, "output_length": 20, "hash_ids": [0, 1]},
        {"timestamp": 9, "input_length": 700, "output_length": 30, "hash_ids": [0, 3]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    workload = load_workload(f"mooncake:{path}", 3)
    assert workload.requests[0].segments == ((0, 512), (1, 512), (2, 76))
    scaled = scale_workload(workload, LengthScaling(prompt_divisor=8))
    assert scaled.requests[0].segments == ((0, 64), (1, 64), (2, 10))
    assert [r.prompt_len for r in scaled.requests] == [138, 128, 88]
    a, b, c = prompts_of(scaled, maker)
    assert a[:128] == b  # the same two blocks
    assert a[:64] == c[:64] and a[64:80] != c[64:80]  # block 0 shared, then 1 against 3
    ideal = ideal_prefix_hits([a, b, c])
    assert ideal["ideal_cached_tokens"] == 112 + 64  # b: 127 usable -> 7 blocks; c: 4 blocks
    assert ideal["ideal_hit_rate"] == pytest.approx(176 / (138 + 128 + 88))


def test_synthetic_system_prompts_and_conversations(maker):
    shared = load_workload("synthetic:prompt=10,output=4,shared=48,groups=1", 3, seed=1)
    p = prompts_of(shared, maker)
    assert all(len(x) == 58 for x in p) and p[0][:48] == p[1][:48] == p[2][:48]
    assert p[0][48:] != p[1][48:]
    chats = load_workload("synthetic:prompt=20,output=8,turns=3,conversations=2", 6, seed=1)
    lens = [r.prompt_len for r in chats.requests]
    assert lens == [20, 20, 48, 48, 76, 76]  # each turn adds the answer (8) and a message (20)
    c = prompts_of(chats, maker)
    assert c[2][:20] == c[0] and c[4][:48] == c[2] and c[3][:20] == c[1]
    ideal = ideal_prefix_hits(c)
    assert ideal["ideal_cached_tokens"] == 2 * (16 + 48)  # turn 2: 1 block of 20; turn 3: 3 of 48
    assert chats.description["turns_dist"]["kind"] == "fixed"


def test_sharing_keys_are_checked():
    with pytest.raises(WorkloadError, match="groups= needs shared"):
        load_workload("synthetic:prompt=10,output=4,groups=3", 2)
    with pytest.raises(WorkloadError, match="whole number"):
        load_workload("synthetic:prompt=10,output=4,turns=2,conversations=1.5", 2)
    with pytest.raises(WorkloadError, match="not KEY=VALUE"):
        load_workload("synthetic:prompt=10,output=4,system=3", 2)


def test_measured_hit_rate_counts_successful_requests():
    recs = [RequestRecord(i, 100, 5, scheduled_s=0.0) for i in range(3)]
    for r, cached in zip(recs, (0, 64, 96), strict=True):
        r.finish_reason, r.cached_tokens = "length", cached
    recs[2].finish_reason = "error"
    run = RunResult(
        name="scls", kind="policy", repeat=0, config={}, requests=recs, duration_s=1.0, wall_s=1.0
    )
    assert metrics.prefix_metrics(run) == {"prefix_cached_tokens": 64, "prefix_hit_rate": 0.32}


def test_the_ideal_counts_blocks_as_the_worker_does():
    assert WORKER_BLOCK_TOKENS == DEFAULT_BLOCK_TOKENS


def test_sampled_conversations_keep_every_turn(tmp_path):
    rows = [
        {"timestamp": t, "input_length": 512 * len(ids), "output_length": 5, "hash_ids": ids}
        for t, ids in enumerate([[0, 1], [0, 2], [0, 1, 3], [0, 2, 4], [0], [0, 1, 3, 5]])
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for seed in range(6):
        kept = load_workload(f"mooncake:{path}", 100, seed=seed, conversations=0.5)
        roots = {r.segments[1][0] for r in kept.requests if len(r.segments) > 1}
        turns = {1: 3, 2: 2}
        assert kept.description["num_requests"] == sum(turns[k] for k in roots) + sum(
            len(r.segments) == 1 for r in kept.requests
        )
        assert [r.index for r in kept.requests] == list(range(len(kept.requests)))
    with pytest.raises(WorkloadError, match="needs a trace whose prompts name"):
        load_workload("synthetic:prompt=4,output=4", 4, conversations=0.5)


def test_sharegpt_chat_turns_resend_the_conversation(tmp_path, maker):
    convs = [
        {"conversations": [
            {"from": "human", "value": "Tell me about rivers."},
            {"from": "gpt", "value": "Rivers flow to the sea."},
            {"from": "human", "value": "And mountains?"},
            {"from": "gpt", "value": "Mountains rise above the clouds, mostly."},
        ]},
        {"conversations": [
            {"from": "human", "value": "Bake bread?"},
            {"from": "gpt", "value": "Flour, water, salt and yeast."},
        ]},
    ]  # fmt: skip
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(convs))
    tok = maker.tokenizer

    def tokenize(text):
        return list(tok.encode(text, add_special_tokens=False))

    w = load_workload(f"sharegpt-chat:{path}", 10, tokenize=tokenize)
    first, other, second = w.requests  # round robin: turn 1 of both, then turn 2
    assert other.prompt_ids == tuple(tokenize("Bake bread?"))
    assert second.prompt_ids[: first.prompt_len] == first.prompt_ids
    assert second.prompt_len == first.prompt_len + first.output_len + len(
        tokenize("And mountains?")
    )
    assert second.output_len == len(tokenize("Mountains rise above the clouds, mostly."))
    assert [r.index for r in w.requests] == [0, 1, 2]
