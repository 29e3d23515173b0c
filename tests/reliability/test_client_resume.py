"""Clients that resume on their own: a real broker process is SIGKILLed in the middle of the
clients' streams and started again on the same ports, without a journal (it knows nothing of
their requests and runs them anew) or on its journal (it takes them back with the tokens it
had delivered); its worker rejoins by itself, and the clients resubmit their requests by id.
Every stream then equals the undisturbed run: no token twice, none missing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from broker_procs import RUN_PY, BrokerProcs, wait_for_workers

from engine.client import AsyncClient, Client, Disconnected

pytestmark = pytest.mark.timeout(240)

PROMPT = [5, 17, 99, 4, 250, 31]
NUM_TOKENS = 300  # long enough to be mid-stream when the broker dies (a few ms per token)
KILL_AFTER = 6  # tokens received before the broker is killed


@pytest.fixture
def procs(request, tiny_model_dir, tmp_path):
    args = ["--slice-len", "8", "--client-grace", "2"]
    if getattr(request, "param", "no-journal") == "journal":
        args += ["--journal", str(tmp_path / "journal.sqlite")]
    procs = BrokerProcs(tiny_model_dir, tmp_path, tuple(args))
    try:
        procs.start_broker()
        procs.start_worker()
        with Client(procs.client_addr) as client:
            wait_for_workers(client, 1)
        yield procs
    finally:
        procs.close()


def restart(procs: BrokerProcs) -> float:
    """Kill the broker and start it again; returns when it was killed (time.monotonic())."""
    killed_at = time.monotonic()
    procs.kill_broker()
    procs.start_broker()
    return killed_at


BOTH = pytest.mark.parametrize("procs", ["no-journal", "journal"], indirect=True)


@BOTH
def test_streams_and_a_generate_continue_across_a_broker_restart(procs):
    greedy = dict(prompt_ids=PROMPT, max_tokens=NUM_TOKENS, ignore_eos=True)
    sampled = dict(greedy, temperature=0.9, top_k=50)  # no seed given: the client picks one
    restarted = []  # (tokens received before the kill, when it was killed)
    next_token_at = []  # when the first token after the kill arrived

    async def stream(client: AsyncClient, params: dict, kill: bool):
        ids, text = [], ""
        async with client.stream(**params) as s:
            async for delta in s:
                ids += delta.token_ids
                text += delta.text
                if kill and restarted and not next_token_at:
                    next_token_at.append(time.monotonic())
                if kill and len(ids) >= KILL_AFTER and not restarted:
                    restarted.append((len(ids), await asyncio.to_thread(restart, procs)))
        return ids, text, s.result

    async def main():
        async with AsyncClient(procs.client_addr, timeout_s=180) as client:
            reference = await client.generate(**greedy)
            results = await asyncio.gather(
                stream(client, greedy, kill=True),
                stream(client, sampled, kill=False),
                client.generate(**greedy),
            )
        return reference, *results

    reference, (g_ids, g_text, g_result), (s_ids, s_text, s_result), whole = asyncio.run(main())
    ((num_before, killed_at),) = restarted
    assert num_before < NUM_TOKENS  # the broker died mid-stream
    print(
        f"FIGURES client resume ({'journal' if procs.journal else 'no journal'}): the next "
        f"token arrived {next_token_at[0] - killed_at:.2f} s after the broker was killed"
    )
    assert g_ids == reference.token_ids and g_text == reference.text  # nothing twice or lost
    assert g_result.token_ids == reference.token_ids
    assert len(s_ids) == NUM_TOKENS and s_ids == s_result.token_ids and s_text == s_result.text
    assert whole.token_ids == reference.token_ids
    if procs.journal:  # the restarted broker took the three requests back, and resumed them
        assert "journal: recovered 3 unfinished requests" in procs.logs("broker")


@BOTH
def test_the_cli_stream_continues_across_a_broker_restart(procs):
    with Client(procs.client_addr, timeout_s=120) as client:
        reference = client.generate("The quick brown fox", max_tokens=NUM_TOKENS, ignore_eos=True)
    cli = subprocess.Popen(
        [sys.executable, str(RUN_PY), "generate", "The quick brown fox", "--raw", "--stream",
         "--ignore-eos", "--max-tokens", str(NUM_TOKENS), "--connect", procs.client_addr],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        first = cli.stdout.read1(64)  # some text has arrived: the request is running
        restart(procs)
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, err.decode(errors="replace")
    assert (first + out).decode() == reference.text + "\n"
    assert "resubmitted 1 request\n" in err.decode() and "Traceback" not in err.decode()
    if procs.journal:
        assert "journal: recovered 1 unfinished request (" in procs.logs("broker")


def test_a_broker_that_stays_away_fails_the_request_after_the_resume_timeout(procs):
    with Client(procs.client_addr, timeout_s=60, resume_timeout_s=1.0) as client:
        stream = client.stream(prompt_ids=PROMPT, max_tokens=NUM_TOKENS, ignore_eos=True)
        next(stream)
        procs.kill_broker()
        with pytest.raises(Disconnected) as info:
            for _ in stream:
                pass
    assert info.value.reason == "lost" and "resume_timeout_s=1 s" in str(info.value)
