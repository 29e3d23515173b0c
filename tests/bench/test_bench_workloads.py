"""Workload parsers on small fixtures (malformed rows included), synthetic specs, scaling."""

from __future__ import annotations

import json

import pytest

from engine.bench import synthetic, traces
from engine.bench.traces import TraceFormatError
from engine.bench.workloads import (
    LengthScaling,
    RequestSpec,
    WorkloadError,
    load_workload,
    scale_workload,
    select,
)

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:50.9951690,879,0
"""
BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,0,1087,Conversation log
118,GPT-4,417,267,684,API log
"""
MOONCAKE = """{"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": [0, 1]}

{"timestamp": 3052, "input_length": 2287, "output_length": 316, "hash_ids": [0, 2]}
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_azure(tmp_path):
    reqs = traces.parse("azure", _write(tmp_path, "a.csv", AZURE))
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(374, 44), (396, 109), (879, 0)]
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert reqs[2].arrival_s == reqs[1].arrival_s


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ("2023-11-16 18:15:51.0,abc,44", "ContextTokens is 'abc'"),
        ("2023-11-16 18:15:51.0,12,-3", "GeneratedTokens is -3"),
        ("16/11/2023 18:15,12,3", "TIMESTAMP is '16/11/2023 18:15'"),
        ("2023-11-16 18:15:51.0,12", "2 fields where the header has 3"),
    ],
)
def test_azure_malformed_row_names_its_line(tmp_path, row, needle):
    path = _write(tmp_path, "bad.csv", AZURE + row + "\n")
    with pytest.raises(TraceFormatError, match=needle) as info:
        traces.parse("azure", path)
    assert info.value.line_no == 5 and f"{path}:5:" in str(info.value)


def test_azure_header_and_missing_file(tmp_path):
    with pytest.raises(
        TraceFormatError, match=r":1: the header lacks column\(s\) \['GeneratedTokens'\]"
    ):
        traces.parse("azure", _write(tmp_path, "h.csv", "TIMESTAMP,ContextTokens\n"))
    with pytest.raises(WorkloadError, match="not found"):
        traces.parse("azure", tmp_path / "nope.csv")
    with pytest.raises(WorkloadError, match="holds no requests"):
        traces.parse("azure", _write(tmp_path, "e.csv", AZURE.splitlines()[0] + "\n"))


def test_burstgpt_skips_failed_requests(tmp_path):
    reqs = traces.parse("burstgpt", _write(tmp_path, "b.csv", BURSTGPT))
    assert [(r.prompt_len, r.output_len, r.arrival_s) for r in reqs] == [
        (472, 18, 0.0),
        (417, 267, 113.0),
    ]
    bad = _write(tmp_path, "bad.csv", BURSTGPT + "x,ChatGPT,1,2,3,API log\n")
    with pytest.raises(TraceFormatError, match=r":5: Timestamp is 'x', expected seconds"):
        traces.parse("burstgpt", bad)
    bad = _write(tmp_path, "bad2.csv", BURSTGPT + "7,ChatGPT,1.5,2,3,API log\n")
    with pytest.raises(TraceFormatError, match=r":5: Request tokens is '1.5'"):
        traces.parse("burstgpt", bad)


def test_mooncake(tmp_path):
    reqs = traces.parse("mooncake", _write(tmp_path, "m.jsonl", MOONCAKE))
    assert [(r.prompt_len, r.output_len, r.arrival_s) for r in reqs] == [
        (6755, 500, 0.0),
        (2287, 316, 3.052),
    ]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"timestamp": 5, "input_length": 1', "not valid JSON"),
        ('{"timestamp": 5, "output_length": 3}', '"input_length" is None'),
        ('{"input_length": 3, "output_length": 3}', '"timestamp" is None'),
        ("[1, 2, 3]", "expected a JSON object per line"),
    ],
)
def test_mooncake_malformed_line(tmp_path, line, needle):
    path = _write(tmp_path, "bad.jsonl", MOONCAKE + line + "\n")
    with pytest.raises(TraceFormatError, match=needle) as info:
        traces.parse("mooncake", path)
    assert info.value.line_no == 4


def _tokenize(text):
    return [len(word) for word in text.split()]  # one token per word


def test_sharegpt(tmp_path):
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "hello there you"},
                                      {"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "alone"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "two words"},
                                      {"from": "gpt", "value": "a b c d"}]},
    ]  # fmt: skip
    path = _write(tmp_path, "s.json", json.dumps(data))
    reqs = traces.parse("sharegpt", path, _tokenize)
    assert [(r.index, r.prompt_len, r.output_len) for r in reqs] == [(0, 3, 1), (1, 2, 4)]
    assert reqs[0].prompt_ids == (5, 5, 3) and reqs[0].arrival_s is None
    assert len(traces.parse("sharegpt", path, _tokenize, limit=1)) == 1
    with pytest.raises(WorkloadError, match="tokenizer"):
        traces.parse("sharegpt", path)


def test_sharegpt_malformed(tmp_path):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad_turn = {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}
    path = _write(tmp_path, "s.json", json.dumps([good, good, bad_turn]))
    with pytest.raises(WorkloadError, match="entry 2: a turn is"):
        traces.parse("sharegpt", path, _tokenize)
    lines = "\n".join([json.dumps(good), json.dumps({"id": 1})]) + "\n"
    with pytest.raises(WorkloadError, match='line 2: expected an object with a "conversations"'):
        traces.parse("sharegpt", _write(tmp_path, "s.jsonl", lines), _tokenize)
    with pytest.raises(TraceFormatError, match="not valid JSON"):
        traces.parse("sharegpt", _write(tmp_path, "t.json", "[{"), _tokenize)


def test_synthetic_specs():
    reqs, desc = synthetic.generate("prompt=40,output=uniform:5:9", 200, seed=1)
    assert {r.prompt_len for r in reqs} == {40}
    assert {r.output_len for r in reqs} <= set(range(5, 10)) and len(
        {r.output_len for r in reqs}
    ) == 5
    assert desc["output_dist"] == {"kind": "uniform", "low": 5, "high": 9}
    again, _ = synthetic.generate("prompt=40,output=uniform:5:9", 200, seed=1)
    assert again == reqs
    other_prompt, _ = synthetic.generate("prompt=fixed:8,output=uniform:5:9", 200, seed=1)
    assert [r.output_len for r in other_prompt] == [r.output_len for r in reqs]  # own stream
    long_tail, _ = synthetic.generate("prompt=4,output=lognormal:250:0.8", 4000, seed=0)
    outputs = sorted(r.output_len for r in long_tail)
    assert sum(outputs) / len(outputs) == pytest.approx(250, rel=0.05)
    assert outputs[int(0.99 * len(outputs))] > 3 * outputs[len(outputs) // 2]


def test_synthetic_empirical(tmp_path):
    trace = _write(tmp_path, "a.csv", AZURE)
    reqs, _ = synthetic.generate(f"prompt=empirical:azure:{trace},output=7", 50, seed=0)
    assert {r.prompt_len for r in reqs} <= {374, 396, 879}
    lengths = _write(tmp_path, "l.txt", "3\n5\n")
    reqs, _ = synthetic.generate(f"prompt=2,output=empirical:{lengths}", 50, seed=0)
    assert {r.output_len for r in reqs} == {3, 5}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("prompt=40", "lacks output="),
        ("prompt=40,output=2,prompt=3", "gives prompt= twice"),
        ("prompt=40,size=2", "is not KEY=VALUE"),
        ("prompt=uniform:9:3,output=2", "swap them"),
        ("prompt=lognormal:5,output=2", "write lognormal:MEAN:SIGMA"),
        ("prompt=zipf:2,output=2", "unknown length distribution"),
        ("prompt=4.5,output=2", "whole number"),
        ("prompt=empirical:/no/such/file,output=2", "no such file"),
    ],
)
def test_synthetic_bad_specs(spec, needle):
    with pytest.raises(WorkloadError, match=needle):
        synthetic.generate(spec, 3, seed=0)


def test_scaling_and_clipping():
    reqs = [RequestSpec(0, 1000, 400), RequestSpec(1, 100, 40), RequestSpec(2, 3, 1)]
    scaling = LengthScaling(
        prompt_divisor=4, output_divisor=2, max_prompt_len=200, max_output_len=100
    )
    out = [scaling.apply(r) for r in reqs]
    assert [(r.prompt_len, r.output_len) for r, _, _ in out] == [(200, 100), (25, 20), (1, 1)]
    assert [(p, o) for _, p, o in out] == [(True, True), (False, False), (False, False)]
    total = LengthScaling(max_total_len=120)
    assert total.apply(RequestSpec(0, 100, 50))[0].prompt_len == 70
    with pytest.raises(WorkloadError, match="no room for a prompt"):
        total.apply(RequestSpec(0, 100, 120))
    with pytest.raises(WorkloadError, match="divisors must be > 0"):
        LengthScaling(prompt_divisor=0)


def test_select_and_load(tmp_path):
    reqs = [RequestSpec(i, 10, 5, arrival_s=float(i)) for i in range(5)]
    kept = select(reqs, 2, offset=2)
    assert [(r.index, r.arrival_s) for r in kept] == [(0, 0.0), (1, 1.0)]
    with pytest.raises(WorkloadError, match="offset 9 is outside"):
        select(reqs, 2, offset=9)
    workload = load_workload(f"azure:{_write(tmp_path, 'a.csv', AZURE)}", num_requests=2)
    assert workload.kind == "azure" and workload.has_timestamps and len(workload.requests) == 2
    assert (
        "Splitwise" in workload.attribution and "Splitwise" in workload.description["attribution"]
    )
    scaled = scale_workload(workload, LengthScaling(prompt_divisor=2, max_output_len=50))
    assert [r.prompt_len for r in scaled.requests] == [187, 198]
    assert scaled.description["scaling"]["num_outputs_clipped"] == 1
    assert scaled.description["scaling"]["prompt_len_before"]["max"] == 396
    for spec, needle in [("azure.csv", "has no ':'"), ("parquet:x", "unknown workload kind")]:
        with pytest.raises(WorkloadError, match=needle):
            load_workload(spec, 2)
