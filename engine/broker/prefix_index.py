"""The broker's index of the workers' prefix caches: which named KV blocks each worker holds, as
told by its BlockEvents (engine/protocol.py), and how many leading blocks of a request's
context each worker could reuse. A hint for placement, never a promise: a block may be evicted
between the plan and the dispatch, and the worker then simply prefills it.

Names follow engine/prefix_hash.py; a worker's names are chained from the root it announced in
Ready (workers serving another model or dtype share nothing). A request's names are computed
once per root and extended as it generates (``RequestNames``). No zmq, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from engine.prefix_hash import block_hashes


@dataclass(slots=True)
class _WorkerCache:
    root: bytes
    block_tokens: int
    names: set[bytes] = field(default_factory=set)


@dataclass(slots=True)
class RequestNames:
    """A request's block names under one root, for its context as last asked."""

    names: list[bytes] = field(default_factory=list)


class PrefixIndex:
    """Per worker, the names of the blocks its prefix cache holds."""

    def __init__(self) -> None:
        self._workers: dict[str, _WorkerCache] = {}
        self._requests: dict[str, dict[bytes, RequestNames]] = {}  # names per request, per root
        # the same, inverted: who holds each name (a worker id, or a set when several do: most
        # names have one holder, and a set costs some 200 bytes a name), and the workers of
        # each root; a request's lookup then costs the blocks it shares, not a pass over every
        # worker
        self._holders: dict[bytes, str | set[str]] = {}
        self._roots: dict[bytes, tuple[int, set[str]]] = {}  # root -> (block tokens, workers)

    def add_worker(self, worker_id: str, root: bytes, block_tokens: int) -> None:
        """A worker joined (or announced itself again): its cache starts empty. No root: it
        has no prefix cache and is not indexed."""
        self.remove_worker(worker_id)
        if root and block_tokens > 0:
            self._workers[worker_id] = _WorkerCache(root, block_tokens)
            self._roots.setdefault(root, (block_tokens, set()))[1].add(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        cache = self._workers.pop(worker_id, None)
        if cache is None:
            return
        self._unhold(worker_id, cache.names)
        members = self._roots[cache.root][1]
        members.discard(worker_id)
        if not members:
            del self._roots[cache.root]

    def apply(self, worker_id: str, stored: list[bytes], removed: list[bytes]) -> None:
        cache = self._workers.get(worker_id)
        if cache is None:
            return
        gone = cache.names.intersection(removed)
        cache.names.difference_update(gone)
        self._unhold(worker_id, gone)
        for name in stored:
            if name not in cache.names:
                cache.names.add(name)
                held = self._holders.get(name)
                if held is None:
                    self._holders[name] = worker_id
                elif isinstance(held, str):
                    self._holders[name] = {held, worker_id}
                else:
                    held.add(worker_id)

    def _unhold(self, worker_id: str, names: set[bytes]) -> None:
        for name in names:
            held = self._holders[name]
            if isinstance(held, str):
                del self._holders[name]  # its only holder
                continue
            held.discard(worker_id)
            if len(held) == 1:
                self._holders[name] = next(iter(held))

    @property
    def active(self) -> bool:
        """Whether any worker holds a named block (else lookups can be skipped)."""
        return bool(self._holders)

    def num_blocks(self, worker_id: str) -> int:
        cache = self._workers.get(worker_id)
        return len(cache.names) if cache is not None else 0

    def block_tokens(self, worker_id: str) -> int:
        cache = self._workers.get(worker_id)
        return cache.block_tokens if cache is not None else 0

    def for_request(self, request_id: str, token_ids: Callable[[], list[int]]) -> Mapping[str, int]:
        """``cached_tokens`` of a live request, its names kept until ``forget``; empty while no
        worker holds a named block."""
        if not self.active:
            return {}
        return self.lazy_cached_tokens(token_ids, self._requests.setdefault(request_id, {}))

    def forget(self, request_id: str) -> None:
        """The request ended: drop its names."""
        self._requests.pop(request_id, None)

    def lazy_cached_tokens(
        self, token_ids: Callable[[], list[int]], memo: dict[bytes, RequestNames]
    ) -> Mapping[str, int]:
        """``cached_tokens`` computed when a policy first reads it: a round may look at a few
        of thousands of waiting requests, and the lookups (and the context's token list) of
        the others are not needed."""
        return _Lazy(lambda: self.cached_tokens(token_ids(), memo))

    def cached_tokens(
        self, token_ids: list[int], memo: dict[bytes, RequestNames]
    ) -> dict[str, int]:
        """Per worker with a hit: tokens of ``token_ids[:-1]`` (the context whose KV a worker
        must hold before the next step) found in its prefix cache. ``memo`` keeps the
        request's names per root between calls."""
        found: dict[str, int] = {}
        context = len(token_ids) - 1
        holders = self._holders
        for root, (b, members) in self._roots.items():
            want = context // b
            if want == 0:
                continue
            entry = memo.setdefault(root, RequestNames())
            if len(entry.names) < want:
                entry.names = block_hashes(token_ids, b, root, want, entry.names)
            names = entry.names
            alive = _as_set(holders.get(names[0])) & members  # hold its first i blocks
            i = 1
            while alive and i < want:
                keep = alive & _as_set(holders.get(names[i]))
                for worker_id in alive - keep:
                    found[worker_id] = i * b
                alive, i = keep, i + 1
            for worker_id in alive:
                found[worker_id] = i * b
        if not found:
            return {}
        return {w: found[w] for w in self._workers if w in found}  # in the workers' order


def _as_set(held: str | set[str] | None) -> set[str]:
    if held is None:
        return set()
    return {held} if isinstance(held, str) else held


class _Lazy(Mapping[str, int]):
    """A mapping filled by ``compute`` on first use."""

    __slots__ = ("_compute", "_value")

    def __init__(self, compute: Callable[[], dict[str, int]]) -> None:
        self._compute = compute
        self._value: dict[str, int] | None = None

    def _get(self) -> dict[str, int]:
        if self._value is None:
            self._value = self._compute()
        return self._value

    def __getitem__(self, key: str) -> int:
        return self._get()[key]

    def get(self, key: str, default: int | None = None) -> int | None:  # type: ignore[override]
        return self._get().get(key, default)  # Mapping.get would raise and catch per miss

    def __contains__(self, key: object) -> bool:
        return key in self._get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())
