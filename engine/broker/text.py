"""Incremental detokenization and stop-string matching for one request (pure; the tokenizer's
``decode`` is passed in)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class TextStream:
    """Turns a growing list of token ids into text deltas, once each, holding back what could
    still change: an incomplete UTF-8 character, or a tail that may become a stop string.

    Uses the prefix/read offset method: only a short window of ids is decoded per step, so the
    cost per token is constant, and byte-level BPE merges across token boundaries stay right.
    """

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all text decoded so far (final once finished)
        self._emitted_len = 0  # characters of ``text`` already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Account for ``token_ids`` (the whole generated list so far); return the new text that
        is safe to emit. Sets ``stopped`` (and cuts ``text``) when a stop string appears."""
        if self.stopped:
            return ""
        prefix_text = self._decode(token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(token_ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(token_ids)
        if not self._stop:  # nothing to hold back (the common case: one call less per token)
            return self._take(len(self.text))
        if self._cut_at_stop():
            self.stopped = True
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held_back())

    @property
    def emitted(self) -> str:
        """The text handed out so far (what a resumed stream's catch-up Delta carries)."""
        return self.text[: self._emitted_len]

    def finish(self) -> str:
        """The request ended: emit everything not yet emitted."""
        return self._take(len(self.text))

    def _cut_at_stop(self) -> bool:
        start = max(0, self._emitted_len - self._max_stop_len)
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop_len - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self._emitted_len)
        delta = self.text[self._emitted_len : upto]
        self._emitted_len = upto
        return delta
