"""Progress of a benchmark run: a one-line bar redrawn in place on a terminal, plain lines
(about every 10% and at most every 10 s) otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.num_done = 0
        self.num_failed = 0
        self._started_at = time.monotonic()
        self._last_line_at = 0.0
        self._last_decile = -1

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._draw(force=True)

    def advance(self, ok: bool = True) -> None:
        self.num_done += 1
        self.num_failed += not ok
        self._draw()

    def finish(self) -> None:
        if self.tty or self.num_done < self.total:
            self._draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed_s = time.monotonic() - self._started_at
        rate = self.num_done / elapsed_s if elapsed_s > 0 else 0.0
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        return (
            f"{self.label}: {self.num_done}/{self.total} requests{failed} | "
            f"{elapsed_s:6.1f} s | {rate:5.2f} req/s"
        )

    def _draw(self, force: bool = False) -> None:
        if self.tty:
            width = 24
            filled = width * self.num_done // max(1, self.total)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {self.line()}")
            self.stream.flush()
            return
        now = time.monotonic()
        decile = 10 * self.num_done // max(1, self.total)
        if force or decile > self._last_decile or now - self._last_line_at >= 10.0:
            if not force and now - self._last_line_at < 1.0 and self.num_done < self.total:
                return  # many at once: one line is enough
            self._last_decile, self._last_line_at = decile, now
            print(self.line(), file=self.stream, flush=True)
