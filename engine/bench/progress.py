"""Progress of a benchmark run: a one-line bar redrawn in place on a terminal (at most every
0.1 s), plain lines (about every 10% and at most every 10 s) otherwise; and StallWatch, which
tells when a run has made no progress for too long."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# A terminal's bar is redrawn at most this often: a simulation ends thousands of requests a second.
TTY_REDRAW_S = 0.1


class Progress:
    """``detail``: more to say at the end of each line (a simulation's simulated seconds)."""

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        detail: Callable[[], str] | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.detail = detail
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

    def note(self, message: str) -> None:
        """A line of its own (e.g. why the run stopped), below the bar on a terminal."""
        prefix = "\n" if self.tty else ""
        print(f"{prefix}{self.label}: {message}", file=self.stream, flush=True)

    def line(self) -> str:
        elapsed_s = time.monotonic() - self._started_at
        rate = self.num_done / elapsed_s if elapsed_s > 0 else 0.0
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        detail = f" | {self.detail()}" if self.detail is not None else ""
        return (
            f"{self.label}: {self.num_done}/{self.total} requests{failed} | "
            f"{elapsed_s:6.1f} s | {rate:5.2f} req/s{detail}"
        )

    def _draw(self, force: bool = False) -> None:
        if self.tty:
            now = time.monotonic()
            if not force and now - self._last_line_at < TTY_REDRAW_S and self.num_done < self.total:
                return
            self._last_line_at = now
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


class StallWatch:
    """No progress for ``timeout_s`` seconds: no token for any request while at least one
    request was in flight all that time. The idle clock restarts at every token and whenever
    the first request of an idle spell is sent (a run waiting for arrivals is not stalled).
    Times are seconds on any one clock; ``timeout_s`` None or <= 0: never stalled."""

    def __init__(self, timeout_s: float | None, now_s: float = 0.0) -> None:
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.idle_since_s = now_s
        self.num_in_flight = 0

    def sent(self, now_s: float, num: int = 1) -> None:
        if self.num_in_flight == 0:
            self.idle_since_s = now_s
        self.num_in_flight += num

    def tokens(self, now_s: float) -> None:
        self.idle_since_s = now_s

    def ended(self, num: int = 1) -> None:
        self.num_in_flight = max(0, self.num_in_flight - num)

    def stalled(self, now_s: float) -> bool:
        return (
            self.timeout_s is not None
            and self.num_in_flight > 0
            and now_s - self.idle_since_s >= self.timeout_s
        )
