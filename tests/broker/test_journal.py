"""The request journal on its own (no zmq, no torch): what it records, what a crash leaves and a
restart recovers, compaction, a damaged log tail or record, a disk that refuses writes.

A crash is taken as what is on disk while the journal is still open: the database and its
write-ahead log are copied as they are, then opened by a second journal."""

from __future__ import annotations

import contextlib
import resource
import shutil
import sqlite3
from pathlib import Path

import pytest

from engine import protocol as p
from engine.broker.journal import Journal, JournalError
from engine.broker.journal_wal import damaged_tail

pytestmark = pytest.mark.timeout(60)


def submit(request_id: str, **fields) -> p.Submit:
    return p.Submit(request_id=request_id, prompt_ids=[5, 6, 7], max_tokens=16, **fields)


def finished(request_id: str, token_ids: list[int]) -> p.Finished:
    return p.Finished(
        request_id=request_id, finish_reason="length", text="abc", token_ids=token_ids,
        usage=p.Usage(prompt_tokens=3, completion_tokens=len(token_ids)),
        timings=p.Timings(queued_s=0.0, first_token_s=0.1, finished_s=0.2), num_slices=2,
    )  # fmt: skip


def crash_copy(journal: Journal, to: Path) -> Path:
    """The files a broker killed now would leave behind, copied to ``to``."""
    to.mkdir()
    for suffix in ("", "-wal"):
        src = journal.path.with_name(journal.path.name + suffix)
        if src.exists():
            shutil.copyfile(src, to / (journal.path.name + suffix))
    return to / journal.path.name


def accept(journal: Journal, request_id: str, **fields) -> None:
    journal.accepted(request_id, submit(request_id, **fields), [5, 6, 7], b"key")


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "live" / "journal.sqlite")
    yield j
    j.close()


def test_a_crash_keeps_every_committed_request_and_token_and_forgets_ended_ones(journal, tmp_path):
    accept(journal, "a", seed=3, temperature=0.7, deadline_s=30.0)
    accept(journal, "b")
    accept(journal, "c")
    assert journal.commit() == []
    journal.tokens("a", 0, [10, 11])
    journal.tokens("b", 0, [20])
    journal.commit()
    journal.tokens("a", 2, [12])
    journal.finished(finished("b", [20, 21]))
    journal.ended("c")  # cancelled: its client got a final answer
    journal.commit()
    journal.tokens("a", 3, [13])  # not committed: the broker died before the tick ended

    got = Journal(crash_copy(journal, tmp_path / "crash")).recover()
    assert got.dropped == []
    assert [e.request_id for e in got.live] == ["a"]
    a = got.live[0]
    assert a.generated == [10, 11, 12]
    assert (a.submit.seed, a.submit.temperature, a.owner) == (3, 0.7, b"key")
    assert a.prompt_ids == [5, 6, 7]
    assert a.deadline_wall is not None and a.deadline_wall - a.arrived_wall == pytest.approx(30.0)
    assert [e.request_id for e in got.finished] == ["b"]
    assert got.finished[0].finished == finished("b", [20, 21])


def test_a_second_broker_cannot_open_a_journal_in_use(journal):
    with pytest.raises(JournalError, match="another broker uses it"):
        Journal(journal.path)


def test_finishing_drops_tokens_and_compaction_drops_old_answers(tmp_path):
    j = Journal(tmp_path / "j.sqlite", replay_s=3600.0)
    accept(j, "a")
    j.tokens("a", 0, list(range(50)))
    j.commit()
    j.finished(finished("a", list(range(50))))
    j.commit()
    db = sqlite3.connect(crash_copy(j, tmp_path / "one"))
    assert db.execute("SELECT count(*) FROM tokens").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 1
    db.close()
    j.replay_s = 0.0
    j.compact()
    j.commit()
    got = Journal(crash_copy(j, tmp_path / "two")).recover()
    assert (got.live, got.finished, got.dropped) == ([], [], [])
    j.close()


def test_answers_older_than_the_replay_window_are_not_recovered(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    accept(j, "a")
    j.commit()
    j.finished(finished("a", [1]))
    j.commit()
    recent = Journal(crash_copy(j, tmp_path / "one"), replay_s=60.0)
    assert [e.request_id for e in recent.recover().finished] == ["a"]
    assert Journal(crash_copy(j, tmp_path / "two"), replay_s=0.0).recover().finished == []
    recent.close()
    j.close()


def test_a_damaged_log_tail_is_dropped_and_reported_the_rest_recovered(journal, tmp_path):
    accept(journal, "a")
    journal.commit()
    journal.tokens("a", 0, [1, 2])
    journal.commit()
    journal.tokens("a", 2, [3, 4])
    journal.commit()
    path = crash_copy(journal, tmp_path / "crash")
    wal = path.with_name(path.name + "-wal")
    assert damaged_tail(wal) is None
    data = bytearray(wal.read_bytes())
    data[-100:] = bytes(100)  # the last frame's page: zeroes, as a write cut short leaves
    wal.write_bytes(bytes(data))
    tail = damaged_tail(wal)
    assert tail is not None and tail.num_frames >= 1 and tail.num_intact_commits >= 2

    got = Journal(path).recover()
    assert [e.generated for e in got.live] == [[1, 2]]  # the last transaction is gone, not more
    assert len(got.dropped) == 1 and "do not form an intact transaction" in got.dropped[0]
    assert f"{tail.num_bytes:,} bytes" in got.dropped[0]


def test_a_half_written_frame_at_the_end_is_dropped(journal, tmp_path):
    accept(journal, "a")
    journal.tokens("a", 0, [1])
    journal.commit()
    path = crash_copy(journal, tmp_path / "crash")
    wal = path.with_name(path.name + "-wal")
    with wal.open("ab") as f:
        f.write(b"\x00\x00\x00\x02" + bytes(1000))  # a frame that never got its page
    got = Journal(path).recover()
    assert [e.generated for e in got.live] == [[1]]
    assert "1,000" not in got.dropped[0] and "1,004 bytes" in got.dropped[0]


def test_a_damaged_record_or_token_row_is_named_and_the_rest_recovered(journal, tmp_path):
    for rid in ("a", "b"):
        accept(journal, rid)
        journal.tokens(rid, 0, [1, 2])
        journal.tokens(rid, 2, [3])
    journal.commit()
    path = crash_copy(journal, tmp_path / "crash")
    db = sqlite3.connect(path)
    db.execute("UPDATE requests SET record = X'00ff' WHERE request_id = 'a'")
    db.execute("UPDATE tokens SET ids = X'01000000' WHERE request_id = 'b' AND start = 2")
    db.commit()
    db.close()
    got = Journal(path).recover()
    assert [(e.request_id, e.generated) for e in got.live] == [("b", [1, 2])]
    assert any("'a'" in d and "cannot be read" in d for d in got.dropped)
    assert any("'b'" in d and "from index 2" in d for d in got.dropped)


@contextlib.contextmanager
def file_size_limit(num_bytes: int):
    """Writes past ``num_bytes`` fail with EFBIG, as on a full disk (the journal ignores
    SIGXFSZ); the old limit comes back after."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


def test_a_journal_that_cannot_write_refuses_new_requests_and_keeps_the_rest(tmp_path):
    j = Journal(tmp_path / "j.sqlite", retry_s=0.0)
    accept(j, "old")
    j.tokens("old", 0, [1])
    assert j.commit() == []
    wal = j.path.with_name(j.path.name + "-wal")
    with file_size_limit(max(wal.stat().st_size, j.path.stat().st_size)):
        j.tokens("old", 1, [2] * 2000)  # more than the limit leaves room for
        accept(j, "new")
        assert j.commit() == ["new"]  # not durable: the broker must refuse it
        assert not j.healthy and "cannot write its request journal" in j.problem
        j.ended("new")  # refused
        j.tokens("old", 2001, [3])
        assert j.commit() == [] and not j.healthy  # still failing, nothing new to refuse
    assert j.commit() == [] and j.healthy  # space again: everything buffered is written
    got = Journal(crash_copy(j, tmp_path / "crash")).recover()
    assert [(e.request_id, e.generated) for e in got.live] == [("old", [1] + [2] * 2000 + [3])]
    j.close()


def test_an_unwritable_place_is_refused_at_open_with_what_to_do(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(JournalError, match="pass another --journal PATH"):
        Journal(tmp_path / "file" / "journal.sqlite")  # a file where a folder should be
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError, match="not a journal"):
        Journal(tmp_path / "junk.sqlite")
