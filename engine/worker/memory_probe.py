"""Memory and utilization of the worker's device, for heartbeats and the dashboard; never raises.

GPU: device memory in use and total (torch.cuda.mem_get_info, whole device) and utilization
(pynvml). CPU: this process's RSS, total RAM, and this process's CPU use as a percent of its
torch threads (100 = every thread it computes with is busy).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

Probe = tuple[int | None, int | None, float | None]

_process = None  # psutil.Process, kept so that cpu_percent measures between calls
_nvml_handles: dict[int, object] = {}
_nvml_failed = False


def _cpu_probe() -> Probe:
    global _process
    import psutil

    if _process is None:
        _process = psutil.Process()
        _process.cpu_percent(None)  # the first call only starts the measurement
    used = _process.memory_info().rss
    total = psutil.virtual_memory().total
    util = _process.cpu_percent(None) / max(1, torch.get_num_threads())
    return int(used), int(total), min(100.0, float(util))


def _nvml_handle(index: int):
    global _nvml_failed
    if index in _nvml_handles or _nvml_failed:
        return _nvml_handles.get(index)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:  # the UUID maps torch's index to NVML's even under CUDA_VISIBLE_DEVICES
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except (AttributeError, pynvml.NVMLError):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        _nvml_handles[index] = handle
        return handle
    except Exception as exc:  # no NVML library or driver: utilization stays unknown
        log.info("NVML unavailable, GPU utilization will not be reported: %s", exc)
        _nvml_failed = True
        return None


def _gpu_probe(device: torch.device) -> Probe:
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    util = None
    handle = _nvml_handle(index)
    if handle is not None:
        import pynvml

        util = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    return int(total - free), int(total), util


def probe(device: str | torch.device) -> Probe:
    """(memory used bytes, memory total bytes, utilization percent), None where unknown."""
    try:
        device = torch.device(device)
        if device.type == "cuda":
            return _gpu_probe(device)
        return _cpu_probe()
    except Exception as exc:  # a probe must never take the worker down
        log.warning("memory probe of %s failed: %s", device, exc)
        return None, None, None
