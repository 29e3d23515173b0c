"""Idempotent resubmission: a request's fingerprint (what must match for a Submit to be "the
same request"), and the recently finished requests that a resubmission is answered from."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from engine import protocol as p


def fingerprint(msg: p.Submit, prompt_ids: list[int]) -> bytes:
    """Digest of the prompt (as token ids) and its SamplingParams, everything that shapes the
    output; ``stream`` and ``deadline_s`` are left out: a resubmission may change how it listens."""
    shaped = msgspec.msgpack.encode((prompt_ids, msg.sampling()))
    return hashlib.blake2b(shaped, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class FinishedEntry:
    fingerprint: bytes
    owner: bytes
    prompt_tokens: int
    finished: p.Finished


class FinishedCache:
    """The last ``max_entries`` requests that finished normally ("stop" or "length"), by id."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, FinishedEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: FinishedEntry) -> None:
        request_id = entry.finished.request_id
        self._entries.pop(request_id, None)
        self._entries[request_id] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def match(self, request_id: str, fp: bytes, owner: bytes) -> FinishedEntry | None:
        """The finished request a Submit with this id, fingerprint and owner repeats, if any."""
        entry = self._entries.get(request_id)
        if entry is None or entry.fingerprint != fp or entry.owner != owner:
            return None
        return entry

    def discard(self, request_id: str) -> None:
        self._entries.pop(request_id, None)
