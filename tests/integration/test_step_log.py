"""``run.py worker --step-log DIR``: a real worker logs every forward it ran, in the shape the
simulator's calibration fits (engine/bench/calibrate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_helpers import local_engine

from engine.bench.calibrate import read_step_log
from engine.client import Client

pytestmark = pytest.mark.timeout(180)


def test_a_worker_logs_every_forward_it_ran(tiny_model_dir, tmp_path: Path) -> None:
    steps_dir = tmp_path / "steps"
    with local_engine(
        tiny_model_dir, num_workers=1, extra_worker_args=["--step-log", str(steps_dir)],
        policy="scls", slice_len=8, max_gen_len=64,
    ) as engine, Client(engine.client_addr) as client:  # fmt: skip
        outs = [client.generate(prompt_ids=[5, 6, 7, 8], max_tokens=12, ignore_eos=True)
                for _ in range(3)]  # fmt: skip
    assert all(len(o.token_ids) == 12 for o in outs)
    (log,) = steps_dir.glob("*.jsonl")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    # every token came out of a forward that decoded it or ended its prompt's prefill
    assert sum(s["rows"] + s["prefill_rows"] for s in lines) >= 36
    assert all(s["step_s"] >= s["forward_s"] > 0 for s in lines)
    assert [s["at"] for s in lines] == sorted(s["at"] for s in lines)
    prefill, decode, mixed = read_step_log(log)
    assert len(prefill) + len(decode) + len(mixed) == len(lines)
    assert all(c >= 4 for _, c, _ in decode)  # a context holds at least the prompt
