"""Executor semantics: batching, slicing with and without kept KV, joins, reasons, abort, errors."""

from __future__ import annotations

import dataclasses

import pytest

from engine.worker.executor import Executor

from .helpers import (
    BIG_BUDGET,
    drain,
    drain_steps,
    generate_sliced,
    make_item,
    make_prompts,
    make_run,
    solo_greedy,
)

LENS = [3, 17, 60]


@pytest.fixture
def executor(runner) -> Executor:
    return Executor(runner, BIG_BUDGET)


def test_batched_greedy_equals_one_at_a_time(runner, executor):
    prompts = make_prompts(10, [*LENS, 1])
    items = [make_item(f"r{i}", t, max_steps=20) for i, t in enumerate(prompts)]
    executor.submit(make_run(1, items))
    trace = drain(executor)
    for i, prompt in enumerate(prompts):
        assert trace.tokens[f"r{i}"] == solo_greedy(runner, prompt, 20)
        assert trace.released[f"r{i}"].reason == "budget"
    done = trace.done[1]
    assert done.steps == 20 and done.generated_tokens == 80
    assert done.prefill_tokens == sum(len(t) - 1 for t in prompts)
    assert done.pad_tokens == 0  # ragged forwards: rows of 1 to 60 tokens, none padded
    assert done.invalid_tokens == 0 and done.recomputed_tokens == 0
    # the first step prefilled three rows inside the decode forward of the one-token row
    assert not done.prefill_samples and len(done.decode_samples) == 19
    assert done.mixed_samples[0][:4] == (1, 1, 3, round((3 + 17 + 60) / 3))
    assert done.decode_samples[0][:2] == (4, round((4 + 18 + 61 + 2) / 4))  # mean context
    assert 0 < done.measured_peak_bytes <= BIG_BUDGET


def test_keep_kv_slices_equal_uninterrupted_and_recompute(runner):
    prompts = dict(zip(["a", "b", "c"], make_prompts(11, LENS), strict=True))
    whole = generate_sliced(Executor(runner, BIG_BUDGET), prompts, 14, 14, keep_kv=False)
    kept_exec = Executor(runner, BIG_BUDGET)
    kept = generate_sliced(kept_exec, prompts, 14, 3, keep_kv=True)
    recomputed = generate_sliced(Executor(runner, BIG_BUDGET), prompts, 14, 4, keep_kv=False)
    assert kept == whole == recomputed
    assert all(len(t) == 14 for t in whole.values())
    assert kept_exec.kv_parked_bytes == 0  # the last slice ended by "length": nothing parked


def test_kept_kv_is_reused_and_counted(runner, executor):
    prompt = make_prompts(12, [20])[0]
    executor.submit(
        make_run(1, [make_item("a", prompt, max_steps=3, max_new_tokens=9, keep_kv=True)])
    )
    first = drain(executor)
    assert first.released["a"].kv_kept and "a" in executor.kv_store
    # its blocks stay where they are; the unused rest of its reservation went back
    pool = executor.pool
    assert executor.kv_parked_bytes == pool.blocks_for(20 + 3 - 1) * pool.block_bytes
    context = prompt + first.tokens["a"]
    item = make_item("a", context, max_steps=3, max_new_tokens=6, num_generated=3, keep_kv=True)
    executor.submit(make_run(2, [item]))
    done = drain(executor).done[2]
    assert (done.reused_kv_tokens, done.prefill_tokens, done.recomputed_tokens) == (22, 0, 0)


def test_stale_parked_kv_is_recomputed(runner, executor):
    prompt = make_prompts(13, [10])[0]
    executor.submit(make_run(1, [make_item("a", prompt, max_steps=2, keep_kv=True)]))
    out = drain(executor).tokens["a"]
    other = prompt + [out[0] % 500 + 4, 9]  # same length, other tokens: the KV does not match
    executor.submit(make_run(2, [make_item("a", other, num_generated=2)]))
    done = drain(executor).done[2]
    assert done.reused_kv_tokens == 0 and done.prefill_tokens == 11 and done.recomputed_tokens == 1
    assert "a" not in executor.kv_store


def test_join_mid_run_gives_identical_tokens(runner, executor):
    prompts = make_prompts(14, [25, 4, 50])
    executor.submit(make_run(1, [make_item("a", prompts[0], max_steps=16)], join=True))
    trace = drain_steps(executor, 5)
    executor.submit(make_run(2, [make_item("b", prompts[1], max_steps=10)], join=True))
    drain_steps(executor, 3, trace)
    executor.submit(make_run(3, [make_item("c", prompts[2], max_steps=6)], join=True))
    drain(executor, trace)
    for rid, prompt, n in [("a", prompts[0], 16), ("b", prompts[1], 10), ("c", prompts[2], 6)]:
        assert trace.tokens[rid] == solo_greedy(runner, prompt, n)
    assert sorted(trace.done) == [1, 2, 3]


def test_sequential_batches_wait_for_an_empty_running_set(runner, executor):
    prompts = make_prompts(15, [8, 8])
    executor.submit(make_run(1, [make_item("a", prompts[0], max_steps=4)]))
    executor.submit(make_run(2, [make_item("b", prompts[1], max_steps=2)]))
    trace = drain_steps(executor, 4)
    assert "b" not in trace.tokens and 1 in trace.done
    drain(executor, trace)
    assert len(trace.tokens["b"]) == 2 and trace.num_steps == 6


def test_reasons_length_budget_and_eos(runner):
    prompt = make_prompts(16, [12])[0]
    expected = solo_greedy(runner, prompt, 8)
    executor = Executor(runner, BIG_BUDGET)
    executor.submit(make_run(1, [
        make_item("len", prompt, max_steps=8, max_new_tokens=3),
        make_item("bud", prompt, max_steps=5, max_new_tokens=20),
    ]))  # fmt: skip
    trace = drain(executor)
    assert (trace.released["len"].reason, trace.released["len"].num_generated) == ("length", 3)
    assert (trace.released["bud"].reason, trace.released["bud"].num_generated) == ("budget", 5)
    assert not trace.released["bud"].kv_kept

    eos = expected[3]  # make the 4th greedy token the model's EOS
    runner.info = dataclasses.replace(runner.info, eos_token_ids=(eos,))
    executor = Executor(runner, BIG_BUDGET)
    executor.submit(make_run(1, [
        make_item("stop", prompt, max_steps=8, ignore_eos=False, keep_kv=True),
        make_item("ignore", prompt, max_steps=8, ignore_eos=True),
    ]))  # fmt: skip
    trace = drain(executor)
    first = expected.index(eos)
    assert trace.tokens["stop"] == expected[: first + 1]  # the EOS token is reported
    assert trace.released["stop"].reason == "eos" and not trace.released["stop"].kv_kept
    assert trace.tokens["ignore"] == expected
    assert executor.kv_parked_bytes == 0


def test_abort_running_queued_and_parked(runner, executor):
    prompts = make_prompts(17, [6, 30, 9])
    expected_b = solo_greedy(runner, prompts[1], 12)
    executor.submit(make_run(9, [make_item("p", prompts[2], max_steps=1, keep_kv=True)]))
    drain(executor)
    assert "p" in executor.kv_store
    executor.submit(
        make_run(
            1, [make_item("a", prompts[0], max_steps=12), make_item("b", prompts[1], max_steps=12)]
        )
    )
    executor.submit(make_run(2, [make_item("q", prompts[2], max_steps=3)]))
    trace = drain_steps(executor, 4)
    executor.abort(["a", "q", "p"])
    assert executor.num_running == 1 and "p" not in executor.kv_store
    drain(executor, trace)
    assert trace.released["a"].reason == "aborted" and trace.released["a"].num_generated == 4
    assert trace.released["q"].reason == "aborted" and trace.released["q"].num_generated == 0
    assert trace.tokens["b"] == expected_b
    assert sorted(trace.done) == [1, 2]


def test_abort_of_the_last_row_is_reported(runner, executor):
    executor.submit(make_run(1, [make_item("a", [5, 6, 7], max_steps=50)]))
    executor.step()
    executor.abort(["a"])
    assert executor.has_work()
    result = executor.step()
    assert [r.reason for r in result.released] == ["aborted"] and result.done[0].batch_id == 1
    assert not executor.has_work() and executor.kv_used_bytes == 0


def test_bad_input_is_released_with_an_error(runner, executor):
    good = make_prompts(18, [15])[0]
    max_len = runner.info.max_context_len
    executor.submit(make_run(1, [
        make_item("empty", []),
        make_item("vocab", [5, 6, runner.info.vocab_size + 3]),
        make_item("long", [5] * max_len),
        make_item("good", good, max_steps=6),
        make_item("good", good, max_steps=6),
        make_item("steps", good, max_steps=0),
    ]))  # fmt: skip
    trace = drain(executor)
    errors = {r.request_id: r.message for r in trace.all_released if r.reason == "error"}
    assert set(errors) == {"empty", "vocab", "long", "good", "steps"}
    assert "at position 2" in errors["vocab"] and str(max_len) in errors["long"]
    assert "already running" in errors["good"]
    assert trace.tokens["good"] == solo_greedy(runner, good, 6)
    assert trace.done[1].generated_tokens == 6


def test_seeded_sampling_is_independent_of_slicing_and_batching(runner):
    prompts = dict(zip(["a", "b", "c"], make_prompts(19, LENS), strict=True))
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95)
    alone = {
        rid: generate_sliced(
            Executor(runner, BIG_BUDGET), {rid: t}, 12, 12, False, seed=7, **sampling
        )[rid]
        for rid, t in prompts.items()
    }
    kept = generate_sliced(Executor(runner, BIG_BUDGET), prompts, 12, 5, True, seed=7, **sampling)
    recomputed = generate_sliced(
        Executor(runner, BIG_BUDGET), prompts, 12, 3, False, seed=7, **sampling
    )
    assert kept == alone == recomputed
    other = generate_sliced(
        Executor(runner, BIG_BUDGET), prompts, 12, 12, False, seed=8, **sampling
    )
    assert other != alone


def test_samples_are_bounded(runner, executor):
    executor.submit(make_run(1, [make_item("a", [5, 6], max_steps=150)]))
    done = drain(executor).done[1]
    assert done.steps == 150 and 32 <= len(done.decode_samples) <= 64
    # the first step prefilled the prompt in its forward (a prefill sample), decoding began after
    assert done.prefill_samples == [done.prefill_samples[0]] and done.prefill_samples[0][:2] == (
        1,
        2,
    )
    assert done.decode_samples[0][1] == 3 and done.decode_samples[-1][1] > 100


def test_single_token_prompts_start_from_an_empty_cache(runner, executor):
    executor.submit(
        make_run(1, [make_item("a", [7], max_steps=5), make_item("b", [9], max_steps=5)])
    )
    trace = drain(executor)
    assert trace.tokens["a"] == solo_greedy(runner, [7], 5)
    assert trace.tokens["b"] == solo_greedy(runner, [9], 5)
    assert trace.done[1].prefill_tokens == 0 and not trace.done[1].prefill_samples


def test_a_join_enters_a_running_slice_midway(runner, executor):
    """A request that joins while another's slice runs starts at the next step, beside it;
    both produce exactly their one-at-a-time tokens."""
    prompts = make_prompts(40, [25, 9])
    executor.submit(make_run(1, [make_item("a", prompts[0], max_steps=12)], join=True))
    early = drain_steps(executor, 5)
    assert len(early.tokens["a"]) == 5
    executor.submit(make_run(2, [make_item("b", prompts[1], max_steps=12)], join=True))
    step = executor.step()
    assert [rid for rid, _ in step.generated.tokens] == ["a", "b"]  # b joined, a went on
    rest = drain(executor)
    assert early.tokens["a"] + step.generated.tokens[0][1] + rest.tokens["a"] == solo_greedy(
        runner, prompts[0], 12
    )
    assert step.generated.tokens[1][1] + rest.tokens["b"] == solo_greedy(runner, prompts[1], 12)
    assert rest.done[2].pad_tokens == 0


def test_renew_extends_a_running_slice_without_a_stop(runner, executor):
    """A renewal that arrives before the slice ends lets the row run on in the same dispatch
    (no release, no parking); one for a request that already left changes nothing."""
    prompt = make_prompts(41, [14])[0]
    executor.submit(make_run(1, [make_item("a", prompt, max_steps=4, keep_kv=True)], join=True))
    first = drain_steps(executor, 3)
    assert not first.released
    executor.renew([("a", 10), ("gone", 50)])
    rest = drain(executor)
    assert first.tokens["a"] + rest.tokens["a"] == solo_greedy(runner, prompt, 10)
    assert rest.released["a"].reason == "budget" and rest.released["a"].num_generated == 10
    assert len(rest.all_released) == 1 and rest.done[1].steps == 10


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(runner):
    """In chunks of 16 tokens, a 60-token prompt joining a running row takes four steps to
    prefill; the running row gets a token at every one of them; both equal one-at-a-time
    (served alone the prompt is cut into the same chunks: fixed offsets)."""
    executor = Executor(runner, BIG_BUDGET, max_step_tokens=17, prefill_chunk_tokens=16)
    short, long = make_prompts(42, [5, 60])
    executor.submit(make_run(1, [make_item("s", short, max_steps=12)], join=True))
    first = drain_steps(executor, 2)
    executor.submit(make_run(2, [make_item("l", long, max_steps=6)], join=True))
    during = drain_steps(executor, 4)
    assert len(during.tokens["s"]) == 4  # never stalled by the long prompt
    assert len(during.tokens.get("l", [])) == 1  # its first token once its context is in
    rest = drain(executor)
    assert first.tokens["s"] + during.tokens["s"] + rest.tokens["s"] == solo_greedy(
        runner, short, 12
    )
    assert during.tokens["l"] + rest.tokens["l"] == solo_greedy(runner, long, 6)
    assert rest.done[2].prefill_tokens == 59
