"""Device memory for status reports: NVML on CUDA (``pip install 'meshllm-replica[gpu]'``),
else the process's resident set (also on CUDA when NVML is missing: ``source`` says which)."""

from __future__ import annotations

import contextlib
import logging

import psutil

from meshllm.api.types import DeviceMemory
from meshllm.replica.settings import cuda_visible_devices

log = logging.getLogger(__name__)


def device_memory(device: str) -> DeviceMemory:
    if device.startswith("cuda"):
        gpu = _nvml(device)
        if gpu is not None:
            return gpu
    vm = psutil.virtual_memory()
    return DeviceMemory(
        device=device, used_bytes=replica_rss(), total_bytes=vm.total, source="process"
    )


def replica_rss() -> int:
    """Resident memory of this process and its children: the engine process holds the model."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may have just exited
            total += child.memory_info().rss
    return total


def nvml_device(device: str, visible: str | None) -> int | str | None:
    """The NVML index (int) or UUID (str) of ``cuda:N``, given ``CUDA_VISIBLE_DEVICES``.

    CUDA numbers only the visible devices; NVML numbers every device on the machine. So with
    ``CUDA_VISIBLE_DEVICES=2,3``, ``cuda:0`` is NVML index 2. None: not mappable (a MIG
    instance, or an index past the list). CUDA's own order must be the PCI order NVML uses
    (``CUDA_DEVICE_ORDER=PCI_BUS_ID``) on machines with different GPU models.
    """
    index = int(device.partition(":")[2] or 0)
    if visible is None:
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        return None
    entry = entries[index]
    if entry.isdigit():
        return int(entry)
    return entry if entry.startswith("GPU-") else None


def _nvml(device: str) -> DeviceMemory | None:
    try:
        import pynvml

        target = nvml_device(device, cuda_visible_devices())
        if target is None:
            log.debug("no NVML device for %s (CUDA_VISIBLE_DEVICES)", device)
            return None
        pynvml.nvmlInit()
        handle = (
            pynvml.nvmlDeviceGetHandleByUUID(target)
            if isinstance(target, str)
            else pynvml.nvmlDeviceGetHandleByIndex(target)
        )
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return DeviceMemory(
            device=device, used_bytes=int(info.used), total_bytes=int(info.total), source="nvml"
        )
    except Exception as e:  # no NVML library or no driver: fall back to process memory
        log.debug("NVML unavailable for %s: %s", device, e)
        return None
