"""Chaos on the broker: 200 streaming requests (greedy and seeded) on two workers; the broker
process is SIGKILLed mid-load, its supervisor starts it again on the same journal, and a client
resubmits what it had in flight: every request must end exactly once, every stream continue
without a duplicated or missing token, and every text equal the undisturbed run's."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import zmq
from rel_helpers import ANY_PORT, RawClient, worker_args

from engine.config import BrokerConfig, SchedulerConfig
from engine.launcher import LocalEngine

pytestmark = pytest.mark.timeout(300)

NUM_REQUESTS = 200


def make_load(seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    load = []
    for i in range(NUM_REQUESTS):
        fields = {
            "prompt_ids": [rng.randrange(3, 512) for _ in range(rng.randrange(4, 60))],
            "max_tokens": rng.randrange(24, 72),
            "ignore_eos": True,
            "stream": True,
        }
        if i % 4 == 0:  # a quarter sampled with a seed: the same tokens however often resumed
            fields |= {"temperature": 0.8, "top_p": 0.9, "seed": 1000 + i}
        load.append(fields)
    return load


def submit(client: RawClient, prefix: str, load: list[dict], indices) -> list[str]:
    ids = []
    for i in indices:
        client.submit(f"{prefix}-{i}", **load[i])
        ids.append(f"{prefix}-{i}")
    return ids


def supervised_engine(model_dir, journal_path) -> LocalEngine:
    cfg = BrokerConfig(
        client_addr=ANY_PORT, worker_addr=ANY_PORT, stats_addr=ANY_PORT, model=str(model_dir),
        stats_interval_s=0.1, journal_path=str(journal_path),
        scheduler=SchedulerConfig(policy="scls", slice_len=8, max_gen_len=256),
    )  # fmt: skip
    return LocalEngine(
        cfg, num_workers=2, worker_args=worker_args(model_dir), start_timeout_s=90,
        supervised=True, log_args=["--log-level", "WARNING"],
    )  # fmt: skip


def outputs_of(client: RawClient, ids: list[str]) -> dict[str, tuple[list[int], str]]:
    """Exactly once on this connection: one Accepted, one Finished, no Error, and the Deltas
    concatenated are the Finished tokens and text. Outputs by request index."""
    out = {}
    for request_id in ids:
        rec = client.records[request_id]
        assert len(rec.accepted) == 1 and rec.errors == [], (request_id, rec.accepted, rec.errors)
        assert len(rec.finished) == 1, (request_id, rec.finished)
        fin = rec.finished[0]
        assert rec.tokens == fin["token_ids"] and rec.text == fin["text"], request_id
        out[request_id.split("-", 1)[1]] = (fin["token_ids"], fin["text"])
    return out


def test_sigkilled_broker_restarts_and_every_accepted_request_completes_once(
    tiny_model_dir, tmp_path
):
    load = make_load()
    with (
        supervised_engine(tiny_model_dir, tmp_path / "journal.sqlite") as eng,
        zmq.Context() as ctx,
    ):
        first = RawClient(ctx, eng.client_addr)
        second = None
        try:
            ref_ids = submit(first, "ref", load, range(NUM_REQUESTS))
            first.wait(ref_ids, timeout_s=120)
            reference = outputs_of(first, ref_ids)

            run_ids = submit(first, "run", load, range(NUM_REQUESTS))
            deadline = time.monotonic() + 60
            while sum(bool(first.records[i].finished) for i in run_ids) < 30:  # mid-load
                assert time.monotonic() < deadline, "the load never got going"
                first.pump(5)
            old_pid = eng.broker.proc.pid
            os.kill(old_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            first.pump(0)
            ended = [i for i in run_ids if first.records[i].finished]
            in_flight = [i for i in run_ids if not first.records[i].ended]
            assert ended and in_flight, (len(ended), len(in_flight))

            second = RawClient(ctx, eng.client_addr)  # the client reconnects and resubmits
            resubmitted = submit(second, "run", load, [int(i.split("-")[1]) for i in in_flight])
            got_token_after = None
            deadline = time.monotonic() + 150
            while not all(second.records[i].ended for i in resubmitted):
                assert time.monotonic() < deadline, "resubmitted requests did not end"
                second.pump(10)
                if got_token_after is None and any(second.records[i].tokens for i in resubmitted):
                    got_token_after = time.monotonic() - killed_at
            second.pump(100)
            restarted_pid = eng.broker.proc.pid

            outputs = outputs_of(second, resubmitted)
            for request_id in resubmitted:  # what the first connection saw is a prefix
                seen = first.records[request_id].tokens
                assert second.records[request_id].tokens[: len(seen)] == seen, request_id
            outputs |= {i.split("-")[1]: (first.records[i].finished[0]["token_ids"],
                                          first.records[i].finished[0]["text"]) for i in ended}  # fmt: skip
            wrong = [(i, outputs[i][0] == reference[i][0]) for i in reference if outputs.get(i) != reference[i]]  # fmt: skip
            resumed = [i for i in resubmitted if second.records[i].accepted[0].get("resumed")]
            assert len(outputs) == NUM_REQUESTS and wrong == [], f"(index, same tokens): {wrong}"
            assert restarted_pid != old_pid and eng.broker.num_restarts == 1
            assert len(resumed) >= len(in_flight) - 5  # all but those the journal never acked
        finally:
            first.close()
            if second is not None:
                second.close()
    print(
        f"\nFIGURES broker restart: {NUM_REQUESTS} requests, {len(ended)} finished before the "
        f"SIGKILL, {len(in_flight)} in flight resubmitted ({len(resumed)} resumed from the "
        f"journal), lost 0, duplicated 0, wrong text {len(wrong)}; first token after the kill "
        f"in {got_token_after:.1f} s"
    )


def test_a_journal_that_cannot_write_refuses_new_work_and_loses_nothing_accepted(
    tiny_model_dir, tmp_path
):
    """The broker's files may not grow (RLIMIT_FSIZE, set on the running broker: its writes
    fail with EFBIG as on a full disk): accepted requests finish, new ones are refused with
    journal_unavailable; once it can write again it accepts again."""
    import resource

    load = make_load()
    with (
        supervised_engine(tiny_model_dir, tmp_path / "journal.sqlite") as eng,
        zmq.Context() as ctx,
    ):
        client = RawClient(ctx, eng.client_addr)
        try:
            accepted = submit(client, "acc", load, range(40))
            deadline = time.monotonic() + 60
            while sum(bool(client.records[i].tokens) for i in accepted) < 10:
                assert time.monotonic() < deadline, "the load never got going"
                client.pump(5)
            pid = eng.broker.proc.pid
            old = resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
            refused = submit(client, "new", load, range(40, 45))
            client.wait(accepted + refused, timeout_s=120)
            codes = [client.records[i].errors[0]["code"] for i in refused]
            assert codes == ["journal_unavailable"] * 5
            assert (
                "cannot write its request journal"
                in client.records[refused[0]].errors[0]["message"]
            )
            outputs_of(client, accepted)  # every accepted request finished, once, whole
            assert all(len(client.records[i].tokens) == load[int(i.split("-")[1])]["max_tokens"]
                       for i in accepted)  # fmt: skip

            resource.prlimit(pid, resource.RLIMIT_FSIZE, old)  # room again
            later = []
            while not later or client.records[later[-1]].errors:
                assert len(later) < 200, "still refused with room on the disk"
                later += submit(client, f"later{len(later)}", load, [45])
                client.wait(later[-1:], timeout_s=60)
            outputs_of(client, later[-1:])
            assert eng.broker.proc.pid == pid  # the same broker all along
        finally:
            client.close()
