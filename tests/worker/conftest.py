"""Worker fixtures: one loaded tiny model and a runner over it, with one torch thread (the
machine is shared)."""

from __future__ import annotations

import pytest
import torch

from engine.worker.model_loader import LoadedModel, load_model
from engine.worker.runner import Runner

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir) -> LoadedModel:
    return load_model(str(tiny_model_dir))


@pytest.fixture
def runner(tiny_loaded) -> Runner:
    return Runner(tiny_loaded)
