"""Handoff fixtures: the tiny model loaded once, a runner over it (one torch thread: the machine
is shared), and ZeroMQ contexts that are always terminated under a timeout."""

from __future__ import annotations

import threading

import pytest
import torch
import zmq

from engine.worker.model_loader import LoadedModel, load_model
from engine.worker.runner import Runner

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir) -> LoadedModel:
    return load_model(str(tiny_model_dir))


@pytest.fixture
def runner(tiny_loaded) -> Runner:
    return Runner(tiny_loaded)


@pytest.fixture
def ctx():
    """A context whose sockets all use linger 0; terminated in a thread with a timeout, so a
    socket left open fails the test instead of hanging it."""
    context = zmq.Context()
    yield context
    done = threading.Event()
    threading.Thread(target=lambda: (context.term(), done.set()), daemon=True).start()
    assert done.wait(10.0), "a ZeroMQ socket was left open"
