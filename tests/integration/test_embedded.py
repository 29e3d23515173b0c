"""End to end with the embedded SmolLM2-135M-Instruct: the answer a user expects."""

from __future__ import annotations

import pytest
from engine_helpers import local_engine

from engine.client import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_capital_of_france_through_the_engine():
    with local_engine(
        "embedded", num_workers=2, kv_budget="512MiB", policy="scls", slice_len=4
    ) as engine:
        with Client(engine.client_addr, timeout_s=300) as client:
            result = client.chat(
                [{"role": "user", "content": "What is the capital of France?"}], max_tokens=24
            )
            streamed = "".join(
                d.text for d in client.stream("The capital of France is", max_tokens=6)
            )
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # the model ends its answer itself
    assert result.num_slices >= 2  # slices of 4 tokens: the answer crossed a slice boundary
    assert "Paris" in streamed
