"""Addresses as users type them (engine/addresses.py), and the broker's peer tracker wording on
a broker without CURVE."""

from __future__ import annotations

import logging
import struct

import pytest
import zmq

from engine.addresses import (
    AddressError,
    bind_address,
    bind_host,
    connect_address,
    tcp_host_port,
    with_port_offset,
)
from engine.broker.peers import PeerTracker


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("tcp://broker-host:5556", "tcp://broker-host:5556"),
        ("TCP://h:1", "tcp://h:1"),
        (" localhost:05555 ", "tcp://localhost:5555"),
        ("[::1]:5555", "tcp://[::1]:5555"),
        ("ipc:///tmp/engine", "ipc:///tmp/engine"),
    ],
)
def test_connect_accepts_both_forms(text, expected):
    assert connect_address(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "127.0.0.1", "tcp://127.0.0.1", "h:0", "h:65536", "h:port", "http://h:1", "*:5555",
     "tcp://tcp://h:1:1", "::1:5555", "a b:1", "h:1/x"],
)  # fmt: skip
def test_connect_refuses_nonsense_and_shows_the_form(text):
    with pytest.raises(AddressError, match=r"use HOST:PORT or tcp://HOST:PORT, e\.g\. tcp://x:9"):
        connect_address(text, example="tcp://x:9")


def test_bind_forms():
    assert bind_host("0.0.0.0") == ("0.0.0.0", None)
    assert bind_host("tcp://127.0.0.1:6000") == ("127.0.0.1", 6000)
    assert bind_address("127.0.0.1:*") == "tcp://127.0.0.1:*"
    for bad in ("tcp://", "h:70000", "h:*x"):
        with pytest.raises(AddressError, match="bind"):
            bind_host(bad)
    with pytest.raises(AddressError, match="PORT \\* for any free port"):
        bind_address("127.0.0.1")
    assert tcp_host_port("tcp://h:5") == ("h", 5) and tcp_host_port("tcp://h:*") is None
    assert with_port_offset("tcp://h:5555", 2) == "tcp://h:5557"
    assert with_port_offset("tcp://h:65535", 2) is None and with_port_offset("ipc://x", 2) is None


def _event(kind: int, value: int) -> list[bytes]:
    return [struct.pack("=hi", kind, value), b"tcp://127.0.0.1:5555"]


def test_a_plain_broker_does_not_blame_curve_for_a_client_that_left(caplog):
    with caplog.at_level(logging.DEBUG, logger="engine.broker.peers"):
        plain = PeerTracker("clients", curve=False)
        plain.on_event(_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 104))
        assert plain.num_refused == 0 and "CURVE" not in caplog.text
        assert all(r.levelno == logging.DEBUG for r in caplog.records)
        plain.on_event(_event(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, 0x11))
        assert plain.num_refused == 1 and "another protocol or socket type" in caplog.text
        PeerTracker("clients", curve=True).on_event(
            _event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 104)
        )
        assert "does not speak CURVE" in caplog.text
