"""Fixtures of the client tests: scripted brokers, stopped after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from scripted_broker import Handler, ScriptedBroker, echo


@pytest.fixture
def make_broker() -> Iterator[Callable[..., ScriptedBroker]]:
    brokers: list[ScriptedBroker] = []

    def make(handler: Handler = echo) -> ScriptedBroker:
        brokers.append(ScriptedBroker(handler))
        return brokers[-1]

    yield make
    for broker in brokers:
        broker.stop()
