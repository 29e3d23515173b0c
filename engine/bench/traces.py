"""Parsers of public request traces into RequestSpec lists, each error naming its file and line.

Formats (the public ones, unchanged):

- azure: CSV ``TIMESTAMP,ContextTokens,GeneratedTokens`` (Azure LLM inference traces 2023/2024;
  TIMESTAMP is a wall-clock ``YYYY-MM-DD HH:MM:SS.fffffff``).
- burstgpt: CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``
  (Timestamp in seconds; rows with 0 response tokens are the trace's failed requests: skipped).
- mooncake: JSONL ``{"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}``;
  each hash id names a block of 512 prompt tokens (the last one partial): equal ids become equal
  token blocks (``RequestSpec.segments``), so that requests share prefixes as in the trace.
- sharegpt: JSON list (or JSONL) of ``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}``; as in vLLM's benchmark, the first turn is the prompt
  and the second one's token count the output length; entries with fewer than two turns are
  skipped. Lengths need the model's tokenizer.
- sharegpt-chat: the same files, every turn a request: turn k's prompt is the conversation so
  far (its earlier messages and answers, then message k; token ids concatenated, so each turn's
  prompt starts with the previous one's) and answer k's token count its output length.
  ``CHAT_CONVERSATIONS`` conversations take turns round robin (a new one starts when one ends),
  as users of a chat service do.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.bench.workloads import RequestSpec, WorkloadError


class TraceFormatError(WorkloadError):
    """A trace row that does not parse; the message names the file, the line and the fix."""

    def __init__(self, path: Path | str, line_no: int, problem: str) -> None:
        super().__init__(f"{path}:{line_no}: {problem}")
        self.path = str(path)
        self.line_no = line_no


def parse(
    kind: str,
    path: str | Path,
    tokenize: Callable[[str], list[int]] | None = None,
    limit: int | None = None,
) -> list[RequestSpec]:
    """All requests of the trace at ``path``, sorted by arrival, arrival offsets from the first.
    ``limit``: ShareGPT only (it has no timestamps), stop after that many requests, since each
    one must be tokenized."""
    file = Path(path).expanduser()
    what = f"{_ARTICLE.get(kind, 'a')} {_TITLES.get(kind, kind)} trace file"
    if file.is_dir():
        raise WorkloadError(f"{str(path)!r} is a directory: pass the path of {what}")
    if not file.is_file():
        raise WorkloadError(f"trace file {str(path)!r} not found: pass the path of {what}")
    try:
        return _parse(kind, file, tokenize, limit)
    except UnicodeDecodeError as exc:
        raise WorkloadError(
            f"{file} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
            f"pass the path of {what}"
        ) from None


_TITLES = {"azure": "Azure", "burstgpt": "BurstGPT", "mooncake": "Mooncake"}
_ARTICLE = {"azure": "an"}


def _parse(
    kind: str, file: Path, tokenize: Callable[[str], list[int]] | None, limit: int | None
) -> list[RequestSpec]:
    if kind == "azure":
        rows = list(_azure(file))
    elif kind == "burstgpt":
        rows = list(_burstgpt(file))
    elif kind == "mooncake":
        rows = list(_mooncake(file))
    elif kind in ("sharegpt", "sharegpt-chat"):
        if tokenize is None:
            raise WorkloadError("sharegpt workloads need the model's tokenizer to count tokens")
        out = []
        source = _sharegpt(file, tokenize) if kind == "sharegpt" else _chats(file, tokenize)
        for req in source:
            if limit is not None and len(out) >= limit:
                break
            out.append(req)
        if not out:
            raise WorkloadError(f"{file} holds no conversation with two turns: is it ShareGPT?")
        return out
    else:
        raise WorkloadError(
            f"unknown trace kind {kind!r}: use azure, burstgpt, mooncake, sharegpt or sharegpt-chat"
        )
    if not rows:
        raise WorkloadError(f"{file} holds no requests: check that it is a {kind} trace")
    rows.sort(key=lambda r: r[0])  # stable: equal timestamps keep file order
    first = rows[0][0]
    out = []
    for i, (t, p, o, *segments) in enumerate(rows):
        seg = segments[0] if segments else None
        out.append(
            RequestSpec(index=i, prompt_len=p, output_len=o, arrival_s=t - first, segments=seg)
        )
    return out


# -- CSV traces ------------------------------------------------------------------------------


def _csv_rows(file: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV with a header that holds at least ``columns``."""
    with open(file, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(file, 1, "the file is empty: expected a CSV header")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceFormatError(
                file, 1, f"the header lacks column(s) {missing}: expected {', '.join(columns)}"
            )
        index = {c: header.index(c) for c in columns}
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise TraceFormatError(
                    file,
                    reader.line_num,
                    f"{len(cells)} fields where the header has {len(header)}: fix or remove the row",
                )
            yield reader.line_num, {c: cells[i].strip() for c, i in index.items()}


def _count(file: Path, line_no: int, name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            as_float = None
        if as_float is None or not as_float.is_integer():
            raise TraceFormatError(
                file, line_no, f"{name} is {text!r}, expected a whole number of tokens"
            ) from None
        value = int(as_float)
    if value < 0:
        raise TraceFormatError(file, line_no, f"{name} is {value}, expected a count >= 0")
    return value


def _seconds(file: Path, line_no: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceFormatError(file, line_no, f"{name} is {text!r}, expected seconds") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise TraceFormatError(file, line_no, f"{name} is {text!r}, expected a finite number")
    return value


def _wall_clock(file: Path, line_no: int, text: str) -> float:
    """'2023-11-16 18:15:46.6805900' -> POSIX seconds (fractions of any precision)."""
    base, _, frac = text.partition(".")
    try:
        stamp = datetime.strptime(base.replace("T", " "), "%Y-%m-%d %H:%M:%S")
        fraction = float(f"0.{frac}") if frac else 0.0
    except ValueError:
        raise TraceFormatError(
            file, line_no, f"TIMESTAMP is {text!r}, expected YYYY-MM-DD HH:MM:SS[.fraction]"
        ) from None
    return stamp.timestamp() + fraction


def _azure(file: Path) -> Iterator[tuple[float, int, int]]:
    for line_no, row in _csv_rows(file, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        yield (
            _wall_clock(file, line_no, row["TIMESTAMP"]),
            _count(file, line_no, "ContextTokens", row["ContextTokens"]),
            _count(file, line_no, "GeneratedTokens", row["GeneratedTokens"]),
        )


def _burstgpt(file: Path) -> Iterator[tuple[float, int, int]]:
    columns = ("Timestamp", "Request tokens", "Response tokens")
    for line_no, row in _csv_rows(file, columns):
        output = _count(file, line_no, "Response tokens", row["Response tokens"])
        if output == 0:  # a failed request of the trace (see the BurstGPT README)
            continue
        yield (
            _seconds(file, line_no, "Timestamp", row["Timestamp"]),
            _count(file, line_no, "Request tokens", row["Request tokens"]),
            output,
        )


# -- JSON traces -----------------------------------------------------------------------------


def _json_lines(file: Path) -> Iterator[tuple[int, Any]]:
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(file, line_no, f"not valid JSON ({exc.msg})") from None


def _field_count(file: Path, line_no: int, obj: dict, name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TraceFormatError(
            file, line_no, f'"{name}" is {value!r}, expected a number of tokens >= 0'
        )
    if isinstance(value, float) and not value.is_integer():
        raise TraceFormatError(file, line_no, f'"{name}" is {value!r}, expected a whole number')
    return int(value)


MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id (the trace's README)


def _mooncake_segments(
    file: Path, line_no: int, obj: dict, input_len: int
) -> tuple[tuple[int, int], ...] | None:
    ids = obj.get("hash_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise TraceFormatError(file, line_no, f'"hash_ids" is {ids!r}, expected a list of ints')
    b = MOONCAKE_BLOCK_TOKENS
    out = []
    for k, block_id in enumerate(ids):
        n = min(b, input_len - k * b)
        if n <= 0:
            break
        out.append((block_id, n))
    return tuple(out) or None


def _mooncake(file: Path) -> Iterator[tuple[float, int, int, tuple | None]]:
    for line_no, obj in _json_lines(file):
        if not isinstance(obj, dict):
            raise TraceFormatError(file, line_no, "expected a JSON object per line")
        stamp = obj.get("timestamp")
        if isinstance(stamp, bool) or not isinstance(stamp, int | float):
            raise TraceFormatError(
                file, line_no, f'"timestamp" is {stamp!r}, expected milliseconds since the start'
            )
        input_len = _field_count(file, line_no, obj, "input_length")
        yield (
            float(stamp) / 1000.0,
            input_len,
            _field_count(file, line_no, obj, "output_length"),
            _mooncake_segments(file, line_no, obj, input_len),
        )


def _sharegpt_entries(file: Path) -> Iterator[tuple[str, Any]]:
    """(where, entry): a JSON list names entries by index, JSONL by line."""
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(file, exc.lineno, f"not valid JSON ({exc.msg})") from None
        for i, entry in enumerate(entries):
            yield f"entry {i}", entry
    else:
        for line_no, entry in _json_lines(file):
            yield f"line {line_no}", entry


def _turn_texts(file: Path, where: str, entry: Any, limit: int | None) -> list[str]:
    """The texts of an entry's first ``limit`` turns (all: None)."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        raise WorkloadError(
            f'{file}: {where}: expected an object with a "conversations" list of '
            '{"from": ..., "value": ...} turns'
        )
    texts = []
    for turn in turns[:limit]:
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(value, str):
            raise WorkloadError(
                f'{file}: {where}: a turn is {turn!r}, expected {{"from": ..., "value": "text"}}'
            )
        texts.append(value)
    return texts


CHAT_CONVERSATIONS = 8


def _chats(file: Path, tokenize: Callable[[str], list[int]]) -> Iterator[RequestSpec]:
    """Every turn of every conversation, conversations interleaved round robin."""

    def turns_of(texts: list[str]) -> list[tuple[list[int], int]]:
        history: list[int] = []
        out = []
        for ask, answer in zip(texts[::2], texts[1::2], strict=False):
            prompt, reply = history + tokenize(ask), tokenize(answer)
            if len(prompt) and reply:
                out.append((prompt, len(reply)))
            history = prompt + reply
        return out

    entries = (_turn_texts(file, where, e, None) for where, e in _sharegpt_entries(file))
    pending = (t for t in map(turns_of, entries) if t)
    active: list[list[tuple[list[int], int]]] = []
    index = 0
    while True:
        while len(active) < CHAT_CONVERSATIONS and (nxt := next(pending, None)) is not None:
            active.append(nxt)
        if not active:
            return
        for conv in list(active):
            prompt, output_len = conv.pop(0)
            yield RequestSpec(index, len(prompt), output_len, None, tuple(prompt))
            index += 1
            if not conv:
                active.remove(conv)


def _sharegpt(file: Path, tokenize: Callable[[str], list[int]]) -> Iterator[RequestSpec]:
    index = 0
    for where, entry in _sharegpt_entries(file):
        texts = _turn_texts(file, where, entry, 2)
        if len(texts) < 2:
            continue  # nothing to answer (vLLM skips these too)
        prompt_ids = tokenize(texts[0])
        output_len = len(tokenize(texts[1]))
        if not prompt_ids or output_len == 0:
            continue  # empty prompt or answer: not a request
        yield RequestSpec(index, len(prompt_ids), output_len, None, tuple(prompt_ids))
        index += 1
