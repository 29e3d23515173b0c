"""Real engines for integration tests: a broker on a thread, worker processes, loopback sockets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engine_helpers import local_engine

from engine.launcher import LocalEngine


@pytest.fixture(scope="module")
def scls_engine(tiny_model_dir) -> Iterator[LocalEngine]:
    """A shared SCLS engine with two workers and short slices (so requests span several)."""
    with local_engine(tiny_model_dir, policy="scls", slice_len=8, max_gen_len=256) as engine:
        yield engine
