"""A broker core on a real journal, crashed and restarted (no sockets, no torch): what the new
core takes back, how it dispatches it, how a resubmission resumes it, and a journal that
cannot write withdrawing the Accepted it could not make durable."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

import pytest

from engine import protocol as p
from engine.broker.core import BrokerCore, ToClient, ToWorker
from engine.broker.journal import Journal
from engine.broker.recovery import Recovery
from engine.broker.validation import Limits
from engine.config import SchedulerConfig
from engine.scheduler.factory import make_policy

pytestmark = pytest.mark.timeout(60)
EOS = 0


def make_core(journal: Journal) -> BrokerCore:
    cfg = SchedulerConfig(policy="scls", slice_len=4, max_gen_len=64)
    decode = lambda ids: "".join(chr(97 + t % 26) for t in ids)  # noqa: E731
    return BrokerCore(cfg, make_policy(cfg), decode, Limits(2048, 64, 1000), journal=journal)


def ready() -> p.Ready:
    return p.Ready(
        version=p.PROTOCOL_VERSION, worker_id="w1", device="cpu", model="m", dtype="float32",
        kv_bytes_per_token=1000, kv_budget_bytes=10_000_000, max_context_len=2048,
        eos_token_ids=[EOS], mem_total_bytes=None, time_model=None,
    )  # fmt: skip


def drain(core: BrokerCore) -> tuple[list[ToClient], list[ToWorker]]:
    out, core.outbox = core.outbox, []
    return [o for o in out if isinstance(o, ToClient)], [o for o in out if isinstance(o, ToWorker)]


def submit(rid: str, **fields) -> p.Submit:
    return p.Submit(request_id=rid, prompt_ids=[5, 6, 7], max_tokens=8, stream=True, **fields)


def crash(journal: Journal, to: Path) -> Path:
    """What a broker killed now leaves on disk (the files as they are while still open)."""
    to.mkdir()
    for suffix in ("", "-wal"):
        src = Path(f"{journal.path}{suffix}")
        if src.exists():
            shutil.copyfile(src, to / (journal.path.name + suffix))
    return to / journal.path.name


def test_a_restarted_core_continues_from_the_delivered_tokens(tmp_path):
    journal = Journal(tmp_path / "a" / "j.sqlite")
    core = make_core(journal)
    core.add_worker(b"id1", ready(), 0.0)
    for rid, fields in (("g", {}), ("s", {"temperature": 0.9, "seed": 4}), ("e", {}), ("f", {})):
        core.submit(b"c1", submit(rid, **fields), [5, 6, 7], 0.0)
    core.schedule(0.0)
    worker = core.workers["w1"]
    core.on_generated(
        worker, p.Generated(tokens=[("g", [11, 12]), ("s", [21]), ("e", [31, EOS])]), 0.1
    )
    core.on_generated(worker, p.Generated(tokens=[("f", [1] * 8)]), 0.1)
    batch_id = core.requests["f"].batch_id
    core.on_released(worker, p.Released(batch_id, "f", "length", 8, False), 0.1)
    assert journal.commit() == []  # the tick ends: now its replies may leave
    core.on_generated(worker, p.Generated(tokens=[("g", [13])]), 0.2)  # never committed

    restarted = Journal(crash(journal, tmp_path / "b"))
    core2 = make_core(restarted)
    recovery = Recovery(restarted.recover())
    recovery.restore(core2, 10.0, 1e12)
    assert sorted(core2.requests) == ["e", "g", "s"]
    assert core2.requests["g"].generated == [11, 12] and core2.requests["s"].generated == [21]
    assert len(core2.finished_cache) == 1  # "f" is answered from the journal

    core2.add_worker(b"id2", ready(), 10.0)
    recovery.worker_joined(core2, [EOS], 10.0)  # "e" delivered its end of sequence: it ended
    assert "e" not in core2.requests
    core2.schedule(10.0)
    _, to_workers = drain(core2)
    items = {
        it.request_id: it for m in to_workers if isinstance(m.msg, p.RunBatch) for it in m.msg.items
    }
    assert items["g"].token_ids == [5, 6, 7, 11, 12] and items["g"].num_generated == 2
    assert items["s"].num_generated == 1 and items["s"].sampling.seed == 4  # next token: index 1

    core2.submit(b"c2", submit("g"), [5, 6, 7], 10.5)  # the client reconnects and resubmits
    core2.submit(b"c2", submit("f"), [5, 6, 7], 10.5)
    replies, _ = drain(core2)
    by_id = {}
    for reply in replies:
        if reply.client_id == b"c2":
            by_id.setdefault(reply.msg.request_id, []).append(reply.msg)
    accepted, catch_up = by_id["g"]
    assert accepted.resumed and catch_up.token_ids == [11, 12]
    assert by_id["f"][0].resumed and by_id["f"][-1].token_ids == [1] * 8
    journal.close()
    restarted.close()


def test_requests_the_journal_could_not_record_are_refused_not_accepted(tmp_path):
    journal = Journal(tmp_path / "j.sqlite", retry_s=0.0)
    core = make_core(journal)
    core.submit(b"c1", submit("kept"), [5, 6, 7], 0.0)
    assert journal.commit() == []
    drain(core)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, old[1]))  # writes fail (EFBIG) as on a full disk
    try:
        core.submit(b"c1", submit("new"), [5, 6, 7], 1.0)
        refused = journal.commit()
        assert refused == ["new"]
        core.refuse_unjournaled(refused)
        replies, _ = drain(core)
        assert [(type(r.msg).__name__, r.msg.request_id) for r in replies] == [("Error", "new")]
        assert replies[0].msg.code == "journal_unavailable"
        core.submit(b"c1", submit("later"), [5, 6, 7], 2.0)  # refused at once while it fails
        replies, _ = drain(core)
        assert replies[0].msg.code == "journal_unavailable" and "kept" in core.requests
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    assert journal.commit() == [] and journal.healthy
    core.submit(b"c1", submit("later"), [5, 6, 7], 3.0)
    replies, _ = drain(core)
    assert isinstance(replies[0].msg, p.Accepted)
    journal.close()


def test_a_restarted_core_keeps_the_time_to_first_token_of_what_it_recovers(tmp_path):
    """A request that had delivered tokens keeps its first token's time (wall clock, in the
    journal), so its TTFT is its own and not the restart's; one that had none gets its first
    token from the new core."""
    import time

    journal = Journal(tmp_path / "a" / "j.sqlite")
    core = make_core(journal)
    core.add_worker(b"id1", ready(), 0.0)
    for rid in ("g", "w"):
        core.submit(b"c1", submit(rid), [5, 6, 7], 0.0)
    core.schedule(0.0)
    core.on_generated(core.workers["w1"], p.Generated(tokens=[("g", [11, 12])]), 0.3)
    assert journal.commit() == []
    delivered_wall = time.time()

    restarted = Journal(crash(journal, tmp_path / "b"))
    core2 = make_core(restarted)
    Recovery(restarted.recover()).restore(core2, 100.0, delivered_wall + 30.0)  # 30 s later
    g, w = core2.requests["g"], core2.requests["w"]
    assert g.first_token_at is not None and w.first_token_at is None
    assert 0.0 <= g.first_token_at - g.arrived_at < 5.0  # not the 30 s the restart took
    assert g.first_token_at == pytest.approx(70.0, abs=5.0)
    journal.close()
    restarted.close()
