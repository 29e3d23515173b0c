"""Overload: past --max-queued-requests a Submit gets "overloaded" with a retry-after estimate;
accepted work is unaffected, and clients that retry after the estimate all get served."""

from __future__ import annotations

import time

import pytest
import zmq
from rel_helpers import RawClient, engine

pytestmark = pytest.mark.timeout(120)
MAX_QUEUED = 8


def test_bounded_queue_refuses_with_retry_after_and_serves_the_accepted(tiny_model_dir):
    with (
        engine(
            tiny_model_dir,
            worker_ids=("w1",),
            max_queued_requests=MAX_QUEUED,
            max_queued_tokens=1600,
        ) as eng,
        zmq.Context() as ctx,
    ):
        client = RawClient(ctx, eng.client_addr)
        prompt = list(range(30, 50))
        params = dict(prompt_ids=prompt, max_tokens=64, ignore_eos=True)
        client.submit("alone", **params)
        client.wait(["alone"], 60)
        expected = client.records["alone"].finished[0]["token_ids"]

        ids = [f"o-{i}" for i in range(5 * MAX_QUEUED)]
        for request_id in ids:  # a burst, all in the broker's queue before any finishes
            client.submit(request_id, **params)
        client.wait(ids, 60)
        accepted = [i for i in ids if client.records[i].finished]
        refused = [i for i in ids if client.records[i].errors]
        assert len(accepted) == MAX_QUEUED and len(refused) == len(ids) - MAX_QUEUED
        assert all(client.records[i].finished[0]["token_ids"] == expected for i in accepted)
        retry_after = [client.records[i].errors[0]["retry_after_s"] for i in refused]
        assert {client.records[i].errors[0]["code"] for i in refused} == {"overloaded"}
        assert all(0.05 <= r <= 60 for r in retry_after)
        assert eng.server.core.num_rejected == len(refused)

        attempts, deadline = len(ids), time.monotonic() + 60  # retry each after its estimate
        pending = {
            i: time.monotonic() + client.records[i].errors[0]["retry_after_s"] for i in refused
        }
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} never accepted"
            for request_id, at in sorted(pending.items(), key=lambda kv: kv[1]):
                if time.monotonic() >= at:
                    client.records[request_id].errors.clear()
                    client.submit(request_id, **params)
                    attempts += 1
                    pending[request_id] = float("inf")
            client.pump(5)
            for request_id in list(pending):
                rec = client.records[request_id]
                if rec.finished:
                    assert rec.finished[0]["token_ids"] == expected
                    del pending[request_id]
                elif rec.errors:
                    pending[request_id] = time.monotonic() + rec.errors[0]["retry_after_s"]
                    rec.errors.clear()

        client.submit("huge", prompt_ids=[7] * 1500, max_tokens=200)  # more than the token bound
        client.wait(["huge"], 10)
        error = client.records["huge"].errors[0]
        assert error["code"] == "prompt_too_long" and "--max-queued-tokens" in error["message"]
        client.close()
    print(
        f"\nFIGURES overload: burst of {len(ids)}, {len(refused)} refused at once; all served after {attempts} submissions"
    )
