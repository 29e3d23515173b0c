"""CURVE: `run.py keys` writes key pairs (private files mode 0600); a broker started with
--curve serves known client and worker keys, refuses unknown ones and plain peers, and logs
every refusal; a key file added to (or removed from) the allow-list takes effect without a
restart."""

from __future__ import annotations

import asyncio
import logging
import shutil
import stat
import subprocess
import sys

import pytest
import zmq
from rel_helpers import engine, wait_for

from engine.client import AsyncStatsSubscriber, Client, Disconnected
from engine.curve import ClientKeys
from engine.supervisor import RUN_PY

pytestmark = pytest.mark.timeout(120)


def keys(directory, *args: str) -> None:
    cmd = [sys.executable, "-m", "engine.cli", "keys", str(directory), *args]
    subprocess.run(cmd, check=True, cwd=RUN_PY.parent, capture_output=True, timeout=60)


def test_curve_serves_known_keys_and_refuses_unknown_ones(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    allowed, other = tmp_path / "keys", tmp_path / "other"
    keys(allowed, "--client", "alice", "--worker", "w1")
    keys(other, "--client", "mallory")
    for secret in [allowed / "broker.key_secret", allowed / "clients" / "alice.key_secret"]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((allowed / "broker.key").stat().st_mode) == 0o644
    broker_key = allowed / "broker.key"
    alice = ClientKeys.load(allowed / "clients" / "alice.key_secret", broker_key)
    mallory = ClientKeys.load(other / "clients" / "mallory.key_secret", broker_key)

    with engine(tiny_model_dir, worker_ids=(), curve_dir=str(allowed)) as eng:
        worker_key = allowed / "workers" / "w1.key_secret"
        eng.add_worker(
            ["--worker-id", "w1", "--curve-key", str(worker_key), "--broker-key", str(broker_key)]
        )
        eng.wait_for_workers(1, timeout_s=60)  # a known worker key joins
        with Client(eng.client_addr, timeout_s=60, curve=alice) as client:
            served = client.generate(prompt_ids=[5, 6, 7], max_tokens=6, ignore_eos=True)
        assert len(served.token_ids) == 6

        assert asyncio.run(_snapshot(eng.stats_addr, alice, 10.0)) is not None  # the stats too
        assert asyncio.run(_snapshot(eng.stats_addr, None, 1.0)) is None

        for keys_used in (mallory, None):  # an unknown key, and no CURVE at all
            with Client(eng.client_addr, connect_timeout_s=1.5, curve=keys_used) as client:
                with pytest.raises(Disconnected):
                    client.generate(prompt_ids=[5, 6, 7], max_tokens=2)
        mallory_z85 = mallory.public.decode()
        wait_for(
            lambda: f"public key {mallory_z85} is not allowed" in caplog.text, 5, "the refusal log"
        )
        wait_for(
            lambda: "refused a connection on the clients socket" in caplog.text, 5, "plain refusal"
        )

        with zmq.Context() as ctx:  # a client key is not a worker key
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            alice.apply(sock)
            sock.connect(eng.addresses["workers"])
            sock.send(b"\x91\xa5ready")
            alice_z85 = alice.public.decode()
            wait_for(
                lambda: (
                    f"on the workers socket from 127.0.0.1: public key {alice_z85}" in caplog.text
                ),
                5,
                "the worker socket's refusal",
            )
            sock.close(linger=0)

        shutil.copy(other / "clients" / "mallory.key", allowed / "clients" / "mallory.key")
        with Client(eng.client_addr, timeout_s=30, connect_timeout_s=10, curve=mallory) as client:
            assert (
                len(client.generate(prompt_ids=[5, 6], max_tokens=3, ignore_eos=True).token_ids)
                == 3
            )
        (allowed / "clients" / "mallory.key").unlink()  # revoked for new connections
        with Client(eng.client_addr, connect_timeout_s=1.5, curve=mallory) as client:
            with pytest.raises(Disconnected):
                client.generate(prompt_ids=[5, 6], max_tokens=2)
        assert eng.server.auth.num_refused >= 3


async def _snapshot(addr: str, curve: ClientKeys | None, timeout_s: float):
    subscriber = AsyncStatsSubscriber(addr, curve=curve)
    try:
        return await subscriber.recv(timeout_s)
    finally:
        subscriber.close()
