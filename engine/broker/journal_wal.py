"""Reads an SQLite write-ahead log the way SQLite recovers it (https://sqlite.org/fileformat2.html,
section 4), to say how much of its end will be dropped: SQLite discards a damaged or cut-short
tail silently, the journal says so."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_MAGICS = (0x377F0682, 0x377F0683)  # little- and big-endian checksums
_HEADER_BYTES = 32
_FRAME_HEADER_BYTES = 24
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class WalTail:
    num_bytes: int  # bytes after the last intact commit
    num_frames: int  # whole or partial frames among them
    num_intact_commits: int  # transactions before them (SQLite replays these)

    def describe(self, path: Path) -> str:
        return (
            f"the journal's log {path} ends with {self.num_bytes:,} bytes ({self.num_frames} "
            "frames) that do not form an intact transaction (a write cut short, or damage); "
            f"they are dropped, the {self.num_intact_commits} intact transactions before them kept"
        )


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK32
        s1 = (s1 + words[i + 1] + s0) & _MASK32
    return s0, s1


def damaged_tail(wal_path: Path) -> WalTail | None:
    """What of ``wal_path`` SQLite will not replay, or None when every byte is an intact
    transaction (or there is no log)."""
    try:
        data = wal_path.read_bytes()
    except OSError:  # none, or unreadable: SQLite's own open then says what is wrong
        return None
    if not data:
        return None
    header = data[:_HEADER_BYTES]
    magic = struct.unpack(">I", header[:4])[0] if len(header) == _HEADER_BYTES else 0
    if magic not in _MAGICS:
        return WalTail(len(data), 0, 0)
    big = bool(magic & 1)
    page_bytes, salts = struct.unpack(">I", header[8:12])[0], header[16:24]
    s0, s1 = _checksum(header[:24], 0, 0, big)
    if (s0, s1) != struct.unpack(">II", header[24:32]):
        return WalTail(len(data), 0, 0)
    frame_bytes = _FRAME_HEADER_BYTES + page_bytes
    kept_until, num_commits, offset = _HEADER_BYTES, 0, _HEADER_BYTES
    while offset + frame_bytes <= len(data):
        frame = data[offset : offset + frame_bytes]
        s0, s1 = _checksum(frame[:8], s0, s1, big)
        s0, s1 = _checksum(frame[_FRAME_HEADER_BYTES:], s0, s1, big)
        if frame[8:16] != salts or (s0, s1) != struct.unpack(">II", frame[16:24]):
            break
        offset += frame_bytes
        if struct.unpack(">I", frame[4:8])[0]:  # a commit frame: the transaction is whole
            kept_until, num_commits = offset, num_commits + 1
    if kept_until == len(data):
        return None
    num_frames = -(-(len(data) - kept_until) // frame_bytes)
    return WalTail(len(data) - kept_until, num_frames, num_commits)
