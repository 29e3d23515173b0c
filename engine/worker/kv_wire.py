"""The KV handoff wire format between workers: a msgspec header, then the raw bytes of every
tensor in a frame of its own (never pickle), and the checks a receiver runs before using them.

A fetch is one request frame (FetchKV or Probe) from the receiver's DEALER to the holder's
ROUTER; the reply is ``[KVHeader, k_0, v_0, k_1, v_1, ...]``: per layer the keys then the
values, each ``[1, num_kv_heads, num_tokens, head_dim]`` in the header's dtype, C order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import msgspec
import torch

from engine.worker.kv_store import Layers

WIRE_VERSION = 1
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_REQUEST_FRAME_BYTES = 1 << 20  # a FetchKV lists no tokens: anything larger is garbage


class KVWireError(ValueError):
    """A handoff frame that cannot be used; the message says what was wrong."""


class FetchKV(msgspec.Struct, array_like=True, tag="fetch", gc=False):
    """Receiver to holder: send me the parked KV of ``request_id`` (covering ``num_tokens``)."""

    version: int
    fetch_id: int
    request_id: str
    num_tokens: int


class Probe(msgspec.Struct, array_like=True, tag="probe", gc=False):
    """Bandwidth probe: the reply carries ``num_bytes`` bytes in one frame."""

    version: int
    fetch_id: int
    num_bytes: int


class KVHeader(msgspec.Struct, array_like=True, tag="kv", gc=False):
    """First frame of a reply. ``status``: "ok" (tensor frames follow), "missing" (the holder
    has no such KV: recompute) or "probe" (one frame of probe bytes follows)."""

    version: int
    fetch_id: int
    request_id: str
    status: Literal["ok", "missing", "probe"]
    token_ids: list[int]
    dtype: str
    shapes: list[list[int]]  # per tensor frame
    byte_lengths: list[int]  # per tensor frame
    message: str = ""


_request_decoder = msgspec.msgpack.Decoder(FetchKV | Probe)
_header_decoder = msgspec.msgpack.Decoder(KVHeader)
_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class KVShape:
    """What a receiver accepts: its model's layout and dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_bytes: int  # more than this (e.g. the KV budget) is refused before allocating


def encode_request(msg: FetchKV | Probe) -> bytes:
    return _encoder.encode(msg)


def decode_request(frame: bytes) -> FetchKV | Probe:
    if len(frame) > MAX_REQUEST_FRAME_BYTES:
        raise KVWireError(f"request frame of {len(frame)} bytes: a fetch is a few bytes")
    try:
        msg = _request_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KVWireError(f"undecodable fetch request: {exc}") from None
    if msg.version != WIRE_VERSION:
        raise KVWireError(f"handoff wire version {msg.version}, this worker speaks {WIRE_VERSION}")
    return msg


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, on the host, C order (a view when already so)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def encode_kv(fetch_id: int, request_id: str, token_ids: tuple[int, ...], layers: Layers) -> list:
    """Frames of an "ok" reply: the header and one buffer per tensor (k then v per layer)."""
    tensors = [t for kv in layers for t in kv]
    buffers = [_tensor_bytes(t) for t in tensors]
    header = KVHeader(
        version=WIRE_VERSION,
        fetch_id=fetch_id,
        request_id=request_id,
        status="ok",
        token_ids=list(token_ids),
        dtype=DTYPE_NAMES[tensors[0].dtype],
        shapes=[list(t.shape) for t in tensors],
        byte_lengths=[b.nbytes for b in buffers],
    )
    return [_encoder.encode(header), *buffers]


def encode_status(
    fetch_id: int, request_id: str, status: Literal["missing", "probe"], message: str = ""
) -> bytes:
    header = KVHeader(WIRE_VERSION, fetch_id, request_id, status, [], "", [], [], message)
    return _encoder.encode(header)


def decode_header(frame: bytes | memoryview) -> KVHeader:
    try:
        header = _header_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KVWireError(f"undecodable handoff header: {exc}") from None
    if header.version != WIRE_VERSION:
        raise KVWireError(
            f"handoff wire version {header.version}, this worker speaks {WIRE_VERSION}"
        )
    return header


def check_header(header: KVHeader, num_frames: int, shape: KVShape, token_ids: list[int]) -> None:
    """Raise KVWireError unless the header describes exactly the KV this receiver expects:
    ``token_ids``, its dtype and layout, one frame per tensor, consistent byte lengths."""
    num_tokens = len(token_ids)
    if header.dtype != DTYPE_NAMES.get(shape.dtype):
        raise KVWireError(f"dtype {header.dtype!r}, this worker runs {shape.dtype}")
    expected = [1, shape.num_kv_heads, num_tokens, shape.head_dim]
    num_tensors = 2 * shape.num_layers
    if len(header.shapes) != num_tensors or len(header.byte_lengths) != num_tensors:
        raise KVWireError(
            f"{len(header.shapes)} shapes and {len(header.byte_lengths)} lengths for "
            f"{num_tensors} tensors ({shape.num_layers} layers, k and v)"
        )
    if num_frames != num_tensors:
        raise KVWireError(f"{num_frames} tensor frames, expected {num_tensors}")
    bad = next((s for s in header.shapes if list(s) != expected), None)
    if bad is not None:
        raise KVWireError(f"tensor shape {bad}, expected {expected}")
    item = torch.empty((), dtype=shape.dtype).element_size()
    each = math.prod(expected) * item
    if any(n != each for n in header.byte_lengths):
        raise KVWireError(f"byte lengths {sorted(set(header.byte_lengths))}, expected {each}")
    if each * num_tensors > shape.max_bytes:
        raise KVWireError(f"{each * num_tensors} bytes exceed the limit of {shape.max_bytes}")
    if header.token_ids != token_ids:
        raise KVWireError(f"the KV covers other tokens than the {num_tokens} this request has")


def decode_kv(
    header: KVHeader, frames: list, shape: KVShape, token_ids: list[int]
) -> tuple[Layers, int]:
    """Per-layer (k, v) CPU tensors from the tensor frames of an "ok" reply, and their bytes;
    everything is checked against ``shape`` and ``token_ids`` before any tensor is built."""
    if header.status != "ok":
        raise KVWireError(f"the holder answered {header.status!r}: {header.message}")
    check_header(header, len(frames), shape, token_ids)
    tensors = []
    for frame, dims, expected in zip(frames, header.shapes, header.byte_lengths, strict=True):
        buf = memoryview(frame)
        if buf.nbytes != expected:
            raise KVWireError(f"a tensor frame has {buf.nbytes} bytes, its header says {expected}")
        if expected == 0:
            tensors.append(torch.empty(dims, dtype=shape.dtype))
        else:  # one copy into memory torch owns (a frame's buffer is read-only)
            tensors.append(torch.frombuffer(bytearray(buf), dtype=shape.dtype).view(dims))
    layers = [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]
    return layers, sum(header.byte_lengths)
