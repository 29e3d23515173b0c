"""What moving a KV cache costs, in seconds, from bandwidths each worker measures (at start-up,
then from real transfers): restoring it from the host tier, or handing it off from another
worker, against recomputing it by prefill. Pure Python (no torch, no zmq).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Path = Literal["keep", "restore", "handoff", "recompute"]

DEFAULT_COPY_BYTES_PER_S = 4e9  # a host memory copy; a GPU's PCIe link is of this order too
DEFAULT_TRANSFER_BYTES_PER_S = 1e9  # loopback TCP between two processes
DEFAULT_TRANSFER_LATENCY_S = 0.002
_EWMA = 0.2  # weight of one new measurement


class KVCostError(ValueError):
    """A bandwidth or latency that cannot be used; the message says what to change."""


@dataclass(slots=True)
class KVMoveModel:
    """Seconds to bring a request's KV (``nbytes``) to this worker's device.

    ``copy_bytes_per_s``: host tier to device (a restore; an offload is the same copy the other
    way). ``transfer_bytes_per_s`` and ``transfer_latency_s``: a handoff from a peer into this
    worker, request to checked arrival. Both are refined in place by ``observe``.
    """

    copy_bytes_per_s: float = DEFAULT_COPY_BYTES_PER_S
    transfer_bytes_per_s: float = DEFAULT_TRANSFER_BYTES_PER_S
    transfer_latency_s: float = DEFAULT_TRANSFER_LATENCY_S

    def __post_init__(self) -> None:
        ok = [self.copy_bytes_per_s > 0, self.transfer_bytes_per_s > 0]
        ok.append(self.transfer_latency_s >= 0)
        if not all(ok) or not all(map(math.isfinite, self._values())):
            raise KVCostError(
                f"KV move model needs bandwidths > 0 and a latency >= 0, got {self._values()}: "
                "check the worker's start-up measurement"
            )

    def _values(self) -> tuple[float, float, float]:
        return (self.copy_bytes_per_s, self.transfer_bytes_per_s, self.transfer_latency_s)

    @classmethod
    def measured(
        cls, copy_bytes_per_s: float, transfer_bytes_per_s: float, transfer_latency_s: float
    ) -> KVMoveModel:
        """From a worker's Ready; zeros (not measured) fall back to the defaults."""
        return cls(
            copy_bytes_per_s or DEFAULT_COPY_BYTES_PER_S,
            transfer_bytes_per_s or DEFAULT_TRANSFER_BYTES_PER_S,
            transfer_latency_s if transfer_bytes_per_s else DEFAULT_TRANSFER_LATENCY_S,
        )

    def restore_s(self, nbytes: int) -> float:
        return nbytes / self.copy_bytes_per_s

    def handoff_s(self, nbytes: int) -> float:
        return self.transfer_latency_s + nbytes / self.transfer_bytes_per_s

    def observe(
        self,
        transfer_samples: Iterable[Sequence[float]] = (),
        copy_samples: Iterable[Sequence[float]] = (),
    ) -> None:
        """Refine from measured (bytes, seconds): a moving average of the rates, so that a
        link that became slower (or a busy peer) is followed within a few transfers."""
        for nbytes, seconds in _valid(transfer_samples):
            rate = nbytes / max(seconds - self.transfer_latency_s, seconds / 2)
            self.transfer_bytes_per_s += _EWMA * (rate - self.transfer_bytes_per_s)
        for nbytes, seconds in _valid(copy_samples):
            self.copy_bytes_per_s += _EWMA * (nbytes / seconds - self.copy_bytes_per_s)


def _valid(samples: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    """Samples large enough to measure a rate (latency dominates below 64 KiB)."""
    out = []
    for sample in samples:
        nbytes, seconds = float(sample[0]), float(sample[1])
        if math.isfinite(nbytes) and math.isfinite(seconds) and nbytes >= 65536 and seconds > 0:
            out.append((nbytes, seconds))
    return out


def choose_path(
    holder_is_target: bool,
    has_holder: bool,
    on_host: bool,
    move_s: float,
    recompute_s: float,
) -> Path:
    """The cheapest way for a request to get its KV on the target worker for its next slice:
    ``move_s`` is the restore time (held there, on the host tier) or the handoff time (held by
    another live worker); ``recompute_s`` its prefill."""
    if not has_holder:
        return "recompute"
    if holder_is_target and not on_host:
        return "keep"
    if move_s > recompute_s:
        return "recompute"
    return "restore" if holder_is_target else "handoff"
