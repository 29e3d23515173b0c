"""One engine (broker thread, one worker process on the tiny model) and one gateway per module;
each is torn down under a timeout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engine_helpers import local_engine
from gateway_helpers import GatewayThread, gateway_for

from engine.launcher import LocalEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Iterator[LocalEngine]:
    with local_engine(
        tiny_model_dir, num_workers=1, policy="scls", slice_len=8, max_gen_len=256
    ) as eng:
        yield eng


@pytest.fixture(scope="module")
def gateway(engine, tiny_model_dir) -> Iterator[GatewayThread]:
    with gateway_for(engine, tiny_model_dir) as gw:
        gw.wait_ready()
        yield gw
