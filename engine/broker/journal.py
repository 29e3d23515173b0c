"""The request journal: every accepted request and every token it delivered, made durable in
SQLite (WAL mode) before the client hears of them, so that a broker restarted on the same file
continues each request exactly once (docs/RELIABILITY.md, "The broker can die")."""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from engine import protocol as p
from engine.broker.journal_wal import damaged_tail

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    record BLOB NOT NULL, record_crc INTEGER NOT NULL,    -- _Record, msgpack
    finished BLOB, finished_crc INTEGER, ended_wall REAL  -- p.Finished once it finished normally
);
CREATE TABLE IF NOT EXISTS tokens (
    request_id TEXT NOT NULL, start INTEGER NOT NULL,     -- index of the first of these tokens
    ids BLOB NOT NULL, ids_crc INTEGER NOT NULL,          -- int32 little-endian
    PRIMARY KEY (request_id, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS first_tokens (                 -- when its first token was delivered
    request_id TEXT PRIMARY KEY, wall REAL NOT NULL
) WITHOUT ROWID;
"""
_COMPACT_EVERY_S = 10.0


class JournalError(Exception):
    """The journal cannot be used; the message says what to change."""


class _Record(msgspec.Struct, array_like=True):
    submit: bytes  # the Submit as received (encoded): its fields are the request's
    prompt_ids: list[int]
    owner: bytes
    arrived_wall: float
    deadline_wall: float | None


@dataclass(slots=True)
class Entry:
    """One journaled request as recovered: live (``finished`` None) or finished normally."""

    request_id: str
    submit: p.Submit
    prompt_ids: list[int]
    owner: bytes
    arrived_wall: float
    deadline_wall: float | None
    chunks: list[list[int]] = field(default_factory=list)  # its tokens, as they were delivered
    finished: p.Finished | None = None
    ended_wall: float = 0.0  # when it finished (wall clock), if it did
    first_token_wall: float | None = None  # when its first token was delivered, if it was

    @property
    def generated(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk]


@dataclass(slots=True)
class Recovered:
    live: list[Entry] = field(default_factory=list)
    finished: list[Entry] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # what could not be recovered, in words


def _crc(blob: bytes) -> int:
    return zlib.crc32(blob)


def _pack(ids: list[int]) -> bytes:
    return array("i", ids).tobytes()


def _unpack(blob: bytes) -> list[int]:
    return array("i", blob).tolist()


class NoJournal:
    """Journal off: nothing is recorded, nothing refused (the broker as before the journal)."""

    healthy = True
    problem = ""

    def accepted(self, request_id: str, msg: p.Submit, prompt_ids: list[int], owner: bytes) -> None:
        pass

    def tokens(self, request_id: str, start: int, ids: list[int]) -> None:
        pass

    def finished(self, finished: p.Finished) -> None:
        pass

    def ended(self, request_id: str) -> None:
        pass

    def commit(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class Journal(NoJournal):
    """Buffers the changes of one broker tick and commits them in one transaction before the
    tick's replies leave (``commit``). When a commit fails (disk full, read-only, I/O error)
    the changes stay buffered and are tried again every second; meanwhile ``healthy`` is False
    and the broker refuses new requests. Owns the file exclusively while open."""

    def __init__(self, path: str | Path, replay_s: float = 60.0, retry_s: float = 1.0) -> None:
        self.path = Path(path)
        self.replay_s = replay_s  # finished results are kept this long, for resubmissions
        self.retry_s = retry_s  # a failing journal is tried again this often
        self.healthy, self.problem = True, ""
        self._ops: list[tuple[str, tuple]] = []
        self._unconfirmed: set[str] = set()  # accepted since the last commit that succeeded
        self._retry_at = self._compact_at = 0.0
        self._tail = damaged_tail(self.path.with_name(self.path.name + "-wal"))
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit fails the write
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=0.2, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # one broker per journal; no -shm file
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise JournalError(f"the journal {self.path} cannot use write-ahead logging")
            db.execute("PRAGMA synchronous=NORMAL")  # survives the process dying; see the doc
            db.execute("PRAGMA journal_size_limit=0")  # the log is cut back after checkpoints
            db.executescript(_SCHEMA)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        except (sqlite3.OperationalError, OSError) as exc:
            why = "another broker uses it" if "locked" in str(exc) else str(exc)
            raise JournalError(
                f"cannot open the journal {self.path}: {why}: pass another --journal PATH "
                "(a writable file that no other broker uses), or --no-journal"
            ) from None
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"the journal {self.path} is not a journal this broker can read ({exc}): move "
                "it away to start a new one, or pass another --journal PATH"
            ) from None
        return db

    # -- what the broker core records ------------------------------------------------------

    def accepted(self, request_id: str, msg: p.Submit, prompt_ids: list[int], owner: bytes) -> None:
        wall = time.time()
        deadline = None if msg.deadline_s is None else wall + msg.deadline_s
        record = msgspec.msgpack.encode(_Record(p.encode(msg), prompt_ids, owner, wall, deadline))
        sql = "INSERT OR REPLACE INTO requests (request_id, record, record_crc) VALUES (?, ?, ?)"
        self._ops.append((sql, (request_id, record, _crc(record))))
        self._ops.append(("DELETE FROM tokens WHERE request_id = ?", (request_id,)))
        self._ops.append(("DELETE FROM first_tokens WHERE request_id = ?", (request_id,)))
        self._unconfirmed.add(request_id)

    def tokens(self, request_id: str, start: int, ids: list[int]) -> None:
        blob = _pack(ids)
        sql = "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?)"
        self._ops.append((sql, (request_id, start, blob, _crc(blob))))
        if start == 0:  # its time to first token survives a restart
            sql = "INSERT OR REPLACE INTO first_tokens VALUES (?, ?)"
            self._ops.append((sql, (request_id, time.time())))

    def finished(self, finished: p.Finished) -> None:
        """It finished normally: keep its answer ``replay_s`` for resubmissions, drop its tokens."""
        blob = p.encode(finished)
        sql = "UPDATE requests SET finished = ?, finished_crc = ?, ended_wall = ? WHERE request_id = ?"
        self._ops.append((sql, (blob, _crc(blob), time.time(), finished.request_id)))
        self._ops.append(("DELETE FROM tokens WHERE request_id = ?", (finished.request_id,)))
        self._ops.append(("DELETE FROM first_tokens WHERE request_id = ?", (finished.request_id,)))

    def ended(self, request_id: str) -> None:
        """It was cancelled or failed (its client got a final Error): forget it."""
        self._ops.append(("DELETE FROM requests WHERE request_id = ?", (request_id,)))
        self._ops.append(("DELETE FROM tokens WHERE request_id = ?", (request_id,)))
        self._ops.append(("DELETE FROM first_tokens WHERE request_id = ?", (request_id,)))
        self._unconfirmed.discard(request_id)

    # -- writing ---------------------------------------------------------------------------

    def commit(self) -> list[str]:
        """Write what this tick changed. Returns the requests accepted since the last commit
        that succeeded, when this one failed: they are not durable, so they must be refused
        (their Accepted not sent); [] otherwise."""
        now = time.monotonic()
        if now >= self._compact_at and self.healthy:
            self.compact()
            self._compact_at = now + _COMPACT_EVERY_S
        if not self._ops or (not self.healthy and now < self._retry_at):
            return self._refuse()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, args in self._ops:
                self._db.execute(sql, args)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            if self.healthy:
                log.error("journal %s: cannot write (%s): refusing new requests", self.path, exc)
            self.healthy, self._retry_at = False, now + self.retry_s
            self.problem = (
                f"the broker cannot write its request journal ({exc}): it accepts no new "
                "request until it can (free space on its disk, or make it writable); requests "
                "already accepted go on"
            )
            return self._refuse()
        if not self.healthy:
            log.warning("journal %s: writable again: accepting requests", self.path)
        self.healthy, self.problem = True, ""
        self._ops.clear()
        self._unconfirmed.clear()
        return []

    def compact(self) -> None:
        """Forget finished answers older than ``replay_s`` (at the next commit; every 10 s)."""
        cutoff = time.time() - self.replay_s
        self._ops.append(("DELETE FROM requests WHERE ended_wall < ?", (cutoff,)))

    def _refuse(self) -> list[str]:
        if self.healthy:
            return []
        refused, self._unconfirmed = sorted(self._unconfirmed), set()
        return refused

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction left to roll back (SQLite ended it on the error)

    def close(self) -> None:
        """Write what is buffered (if it can), then close (the log is checkpointed away)."""
        self.commit()
        try:
            self._db.close()
        except sqlite3.Error as exc:
            log.warning("journal %s: closing: %s", self.path, exc)

    # -- reading ---------------------------------------------------------------------------

    def recover(self) -> Recovered:
        """Every live request with the tokens it delivered, the finished ones still replayable,
        and what was dropped: a damaged log tail, records that fail their checksum."""
        out = Recovered()
        if self._tail is not None:
            out.dropped.append(self._tail.describe(self.path.with_name(self.path.name + "-wal")))
        entries = self._read_requests(out)
        self._read_tokens(entries, out)
        self._read_first_tokens(entries)
        cutoff = time.time() - self.replay_s
        for entry in entries.values():
            if entry.finished is None:
                out.live.append(entry)
            elif entry.ended_wall >= cutoff:
                out.finished.append(entry)
        return out

    def _read_requests(self, out: Recovered) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        sql = "SELECT request_id, record, record_crc, finished, finished_crc, ended_wall FROM requests"
        try:
            for rid, record, crc, finished, finished_crc, ended_wall in self._db.execute(sql):
                entry = self._entry(rid, record, crc, out)
                if entry is None:
                    continue
                if finished is not None:
                    if _crc(finished) != finished_crc:
                        out.dropped.append(f"request {rid!r}: its answer fails its checksum")
                        continue
                    entry.finished = msgspec.msgpack.decode(finished, type=p.Finished)
                    entry.ended_wall = ended_wall
                entries[rid] = entry
        except sqlite3.DatabaseError as exc:
            out.dropped.append(
                f"the journal's table of requests is damaged ({exc}): read {len(entries)} "
                "requests before the damage, the rest dropped"
            )
        return entries

    def _entry(self, rid: str, record: bytes, crc: int, out: Recovered) -> Entry | None:
        try:
            if _crc(record) != crc:
                raise ValueError("it fails its checksum")
            rec = msgspec.msgpack.decode(record, type=_Record)
            submit = p.decode_client_request(rec.submit)
            if not isinstance(submit, p.Submit):
                raise ValueError("it is not a Submit")
        except (ValueError, msgspec.DecodeError, p.ProtocolError) as exc:
            out.dropped.append(f"request {rid!r}: its record cannot be read ({exc}); dropped")
            return None
        return Entry(rid, submit, rec.prompt_ids, rec.owner, rec.arrived_wall, rec.deadline_wall)

    def _read_first_tokens(self, entries: dict[str, Entry]) -> None:
        """When each live request's first token was delivered (a journal written before this
        table existed, or a damaged one, has none: its TTFT then counts from the restart)."""
        try:
            for rid, wall in self._db.execute("SELECT request_id, wall FROM first_tokens"):
                entry = entries.get(rid)
                if entry is not None and entry.chunks:
                    entry.first_token_wall = float(wall)
        except (sqlite3.DatabaseError, TypeError, ValueError):
            log.warning("journal: the first-token times cannot be read; TTFTs count from now")

    def _read_tokens(self, entries: dict[str, Entry], out: Recovered) -> None:
        """Each live request's tokens: the longest run without a gap or a damaged row."""
        broken: set[str] = set()
        num_tokens: dict[str, int] = {}
        sql = "SELECT request_id, start, ids, ids_crc FROM tokens ORDER BY request_id, start"
        try:
            for rid, start, blob, crc in self._db.execute(sql):
                entry = entries.get(rid)
                if entry is None or entry.finished is not None or rid in broken:
                    continue
                if start != num_tokens.get(rid, 0) or _crc(blob) != crc:
                    broken.add(rid)
                    out.dropped.append(
                        f"request {rid!r}: its tokens from index {num_tokens.get(rid, 0)} are "
                        "damaged or missing; it continues from there (greedy and seeded "
                        "requests produce the same tokens again)"
                    )
                    continue
                entry.chunks.append(_unpack(blob))
                num_tokens[rid] = start + len(entry.chunks[-1])
        except sqlite3.DatabaseError as exc:
            out.dropped.append(f"the journal's table of tokens is damaged ({exc}): some dropped")
