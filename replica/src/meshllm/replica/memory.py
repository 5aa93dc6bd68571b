"""Device memory for status reports: NVML on CUDA, the process's resident set on the CPU."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DeviceMemory:
    device: str
    used_bytes: int
    total_bytes: int
    source: str


def device_memory(device: str) -> DeviceMemory:
    if device.startswith("cuda"):
        gpu = _nvml(device)
        if gpu is not None:
            return gpu
    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    return DeviceMemory(device=device, used_bytes=rss, total_bytes=vm.total, source="process")


def _nvml(device: str) -> DeviceMemory | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(device.partition(":")[2] or 0)
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return DeviceMemory(device=device, used_bytes=int(info.used), total_bytes=int(info.total),
                            source="nvml")  # fmt: skip
    except Exception as e:  # no NVML library or no driver: fall back to process memory
        log.debug("NVML unavailable for %s: %s", device, e)
        return None
