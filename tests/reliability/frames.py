"""Malformed and hostile client frames: random bytes, truncated msgpack, wrong types, huge
declared lengths, deep nesting, unknown fields, invalid UTF-8, odd extensions, and well-formed
requests with hostile values. Hypothesis strategies draw single frames; ``make_frames`` expands
one drawn (kind, seed) into many frames at once, so that 100,000 frames take seconds."""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

TYPES = ["submit", "cancel", "get_stats", "nope", "", "SUBMIT"]
FIELDS = [
    "request_id", "prompt", "prompt_ids", "messages", "max_tokens", "temperature", "top_p",
    "top_k", "seed", "stop", "ignore_eos", "stream", "deadline_s", "type", "x", "\u00e9\u00e9",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# A map whose keys are mostly real field names, with values of any type.
wrong_types = st.builds(
    lambda t, fields: _pack({"type": t, **fields}),
    st.sampled_from(TYPES) | values,
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
)

# Requests the broker may accept: small, so the fuzz does not turn into a load test.
valid_submits = st.builds(
    lambda rid, ids, n, extra: _pack(
        {"type": "submit", "request_id": rid, "prompt_ids": ids, "max_tokens": n, **extra}
    ),
    st.text(min_size=1, max_size=8),
    st.lists(st.integers(0, 600), min_size=0, max_size=8),
    st.integers(-2, 6),
    st.dictionaries(st.text(max_size=5), values, max_size=2),  # unknown fields ride along
)

truncated = st.builds(
    lambda frame, cut: frame[: int(len(frame) * cut)],
    valid_submits | wrong_types,
    st.floats(0, 0.99),
)

# Headers that declare far more data than follows (array, map, str, bin, ext of 2**32-1).
HUGE_HEADERS = [
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff",
    b"\xc9\xff\xff\xff\xff\x01",
]
huge_lengths = st.builds(
    lambda header, field, tail: b"\x82\xa4type\xa6submit" + _pack(field) + header + tail,
    st.sampled_from(HUGE_HEADERS),
    st.sampled_from(FIELDS),
    st.binary(max_size=16),
) | st.sampled_from(HUGE_HEADERS)

deep_nesting = st.builds(
    lambda depth, opener, in_field: (
        (b"\x82\xa4type\xa6submit\xa1x" if in_field else b"") + opener * depth + b"\xc0"
    ),
    st.integers(1, 200_000),
    st.sampled_from([b"\x91", b"\x81\xa1k"]),
    st.booleans(),
)

BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]
invalid_utf8 = st.builds(
    lambda field, bad: b"\x82\xa4type\xa6submit" + _pack(field) + bytes([0xA0 | len(bad)]) + bad,
    st.sampled_from(["prompt", "request_id", "type", "x"]),
    st.sampled_from(BAD_UTF8),
) | st.builds(
    lambda bad: bytes([0x81, 0xA0 | len(bad)]) + bad + b"\xa6submit", st.sampled_from(BAD_UTF8)
)

odd_extensions = st.sampled_from(
    [b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x01", b"\xc1", b"\xc7\x00\x05", b""]
)

frames = st.one_of(
    st.binary(max_size=96),
    wrong_types,
    valid_submits,
    truncated,
    huge_lengths,
    deep_nesting,
    invalid_utf8,
    odd_extensions,
)


# ---------------------------------------------------------------------------------------------
# Bulk: one hypothesis example (a kind and a seed) expands into many frames of that kind, fast.

KINDS = ["bytes", "wrong_types", "valid", "truncated", "huge", "deep", "utf8", "hostile", "mixed"]


def _value(rng, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, float("nan"), float("inf"), rng.random()])
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(8)))
    if kind == 5:
        return rng.randbytes(rng.randrange(8))
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _wrong_types(rng) -> bytes:
    msg = {"type": rng.choice(TYPES) if rng.random() < 0.8 else _value(rng)}
    msg.update({rng.choice(FIELDS): _value(rng) for _ in range(rng.randrange(6))})
    return _pack(msg)


def _valid(rng) -> bytes:
    msg = {
        "type": "submit", "request_id": f"fz{rng.randrange(10**6)}",
        "prompt_ids": [rng.randrange(0, 600) for _ in range(rng.randrange(0, 8))],
        "max_tokens": rng.randrange(-2, 5), "ignore_eos": True,
    }  # fmt: skip
    if rng.random() < 0.3:
        msg[rng.choice(["zz", "extra", "\u00e9"])] = _value(rng)  # unknown fields
    if rng.random() < 0.2:
        msg = {"type": rng.choice(["cancel", "get_stats"]), "request_id": msg["request_id"]}
    return _pack(msg)


def _hostile(rng) -> bytes:
    """Well-formed but costly or absurd: huge strings and lists, many messages, long prompts."""
    big = rng.choice([1_000, 30_000, 200_000])
    field = rng.choice(["request_id", "prompt", "stop", "messages", "prompt_ids"])
    value = {
        "request_id": "r" * big,
        "prompt": "word " * (big // 5),
        "stop": ["s"] * (big // 10),
        "messages": [{"role": "user", "content": "hi"}] * (big // 20),
        "prompt_ids": list(range(big // 4)),
    }[field]
    return _pack({"type": "submit", field: value, "max_tokens": 1})


def make_frames(kind: str, seed: int, num_frames: int) -> list[bytes]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(num_frames):
        k = rng.choice(KINDS[:-1]) if kind == "mixed" else kind
        if k == "bytes":
            out.append(rng.randbytes(rng.randrange(96)))
        elif k == "wrong_types":
            out.append(_wrong_types(rng))
        elif k == "valid":
            out.append(_valid(rng))
        elif k == "truncated":
            frame = _valid(rng) if rng.random() < 0.5 else _wrong_types(rng)
            out.append(frame[: rng.randrange(max(1, len(frame)))])
        elif k == "huge":
            out.append(
                b"\x82\xa4type\xa6submit" + _pack(rng.choice(FIELDS)) + rng.choice(HUGE_HEADERS)
            )
        elif k == "deep":
            depth = int(10 ** rng.uniform(0, 3.7))  # beyond the recursion limit (1,000)
            prefix = b"\x82\xa4type\xa6submit\xa1x" if rng.random() < 0.5 else b""
            out.append(prefix + rng.choice([b"\x91", b"\x81\xa1k"]) * depth + b"\xc0")
        elif k == "utf8":
            bad = rng.choice(BAD_UTF8)
            out.append(b"\x82\xa4type\xa6submit\xa6prompt" + bytes([0xA0 | len(bad)]) + bad)
        else:
            out.append(_hostile(rng) if rng.random() < 0.02 else _wrong_types(rng))
    return out
