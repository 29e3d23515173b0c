"""Names of full KV blocks for prefix caching: a hash chained over the blocks' tokens.

Block i of a sequence is named ``H(name of block i-1, its tokens)``, starting from a root that
names the model, the KV dtype and the block size. Two sequences therefore share the name of
block i exactly when their first (i + 1) * block_tokens tokens are equal (and their KV is
computed by the same model in the same dtype), which is what lets a worker reuse the block and
the broker know, from token ids alone, which of a request's blocks a worker holds.

BLAKE2b with 16-byte digests: collisions would hand one request another's KV, so the names must
not collide by chance or by design (a 64-bit hash could be attacked with about 2**32 prompts).
Pure Python, no torch or zmq: the worker and the broker both use it.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

DIGEST_BYTES = 16


def prefix_root(model: str, dtype: str, block_tokens: int) -> bytes:
    """The name every chain starts from: KV is only shared between equal models and dtypes."""
    text = f"scls-prefix-v1\0{model}\0{dtype}\0{block_tokens}"
    return blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


def chain(parent: bytes, block: Sequence[int]) -> bytes:
    """The name of a full block of tokens that follows the block named ``parent``."""
    h = blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(array("q", block).tobytes())
    return h.digest()


def block_hashes(
    token_ids: Sequence[int],
    block_tokens: int,
    root: bytes,
    num_blocks: int | None = None,
    known: Sequence[bytes] = (),
) -> list[bytes]:
    """Names of the full blocks of ``token_ids`` (at most ``num_blocks``); ``known`` are the
    names of its first blocks, already computed: only the ones after them are hashed."""
    full = len(token_ids) // block_tokens
    if num_blocks is not None:
        full = min(full, num_blocks)
    out = list(known[:full])
    parent = out[-1] if out else root
    for i in range(len(out), full):
        parent = chain(parent, token_ids[i * block_tokens : (i + 1) * block_tokens])
        out.append(parent)
    return out
