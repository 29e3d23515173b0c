"""Short, fixed-style renderings of the numbers the dashboard shows (bytes, seconds, rates)."""

from __future__ import annotations

NA = "n/a"
NONE = "—"


def fmt_bytes(num_bytes: int | None) -> str:
    """1536 -> '1.5 KiB'; None -> 'n/a'."""
    if num_bytes is None:
        return NA
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.1f} {unit}"


def fmt_s(seconds: float | None) -> str:
    """A duration: '850ms', '2.10s', '3m05s'; None -> '—'."""
    if seconds is None:
        return NONE
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_rate(per_s: float) -> str:
    """A rate with about three significant digits: '0.25', '3.2', '812', '12.3k'."""
    if per_s >= 10_000:
        return f"{per_s / 1000:.1f}k"
    if per_s >= 100:
        return f"{per_s:.0f}"
    if per_s >= 10:
        return f"{per_s:.1f}"
    return f"{per_s:.2f}"


def fmt_percent(percent: float | None) -> str:
    return NA if percent is None else f"{percent:.0f}%"
