"""A restarted broker takes back what its journal holds: every live request, queued again with
the tokens it had delivered (its next slice continues from them), and the answers of requests
that finished recently, for clients that resubmit them. Pure: clocks passed in."""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING

from engine.broker.journal import Entry, Recovered
from engine.broker.requests import Request, RequestState
from engine.broker.resume import FinishedEntry, fingerprint

if TYPE_CHECKING:
    from engine.broker.core import BrokerCore

_AUTO_ID = re.compile(r"req-(\d+)")


class Recovery:
    """Puts the journal's requests back into ``core`` (``restore``); once the first worker has
    joined, ``worker_joined`` ends those whose last delivered token was an end of sequence
    (the worker's Released that would have ended them never arrived)."""

    def __init__(self, recovered: Recovered) -> None:
        self.recovered = recovered
        self.pending_eos_check: list[str] = []

    def restore(self, core: BrokerCore, now: float, wall: float) -> None:
        for entry in self.recovered.live:
            req = _request(entry, core, now, wall)
            core.add_request(req)
            if req.max_new_tokens <= 0 or req.text.stopped:
                reason = "stop" if req.text.stopped else "length"
                core._finish(req, reason, now, RequestState.FINISHED)  # its end was not journaled
            elif req.generated and not req.params.ignore_eos:
                self.pending_eos_check.append(req.request_id)
        for entry in self.recovered.finished:
            assert entry.finished is not None
            fp = fingerprint(entry.submit, entry.prompt_ids)
            core.finished_cache.add(
                FinishedEntry(fp, entry.owner, len(entry.prompt_ids), entry.finished)
            )
        ids = [e.request_id for e in self.recovered.live + self.recovered.finished]
        numbers = [int(m.group(1)) for i in ids if (m := _AUTO_ID.fullmatch(i))]
        core._auto_ids = itertools.count(max(numbers, default=0) + 1)  # no id given twice
        self._report(core, now)

    def worker_joined(self, core: BrokerCore, eos_token_ids: list[int], now: float) -> None:
        eos = set(eos_token_ids)
        for request_id in self.pending_eos_check:
            req = core.requests.get(request_id)
            if req is not None and req.state is RequestState.WAITING and req.generated[-1] in eos:
                core._finish(req, "stop", now, RequestState.FINISHED)
        self.pending_eos_check = []

    def _report(self, core: BrokerCore, now: float) -> None:
        rec = self.recovered
        num_tokens = sum(len(e.generated) for e in rec.live)
        core.log(
            now,
            "info" if not rec.dropped else "warning",
            f"journal: recovered {len(rec.live)} unfinished request{'s' * (len(rec.live) != 1)} "
            f"({num_tokens} tokens already "
            f"delivered: they continue from there) and {len(rec.finished)} finished answers; "
            f"{len(rec.dropped)} problems",
        )
        for problem in rec.dropped:
            core.log(now, "warning", f"journal: {problem}")


def _request(entry: Entry, core: BrokerCore, now: float, wall: float) -> Request:
    """The request as it was, on no connection (a resubmission from its client adopts it)."""
    arrived_at = now - max(0.0, wall - entry.arrived_wall)
    req = Request.create(
        entry.request_id, b"", entry.submit, entry.prompt_ids, core.decode, arrived_at
    )
    req.owner = entry.owner
    req.fingerprint = fingerprint(entry.submit, entry.prompt_ids)
    if entry.deadline_wall is not None:
        req.deadline_at = now + (entry.deadline_wall - wall)
    for chunk in entry.chunks:  # as delivered: the text stream is where it was, to the char
        req.generated += chunk
        req.text.add(req.generated)
    if entry.first_token_wall is not None and req.generated:  # its TTFT, not the restart's
        req.first_token_at = now - max(0.0, wall - entry.first_token_wall)
    return req
