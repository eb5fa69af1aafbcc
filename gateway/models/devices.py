"""What hardware the models sit on: the GPU's name and memory through NVML when there is one, else RAM.

NVML (the `cuda` extra, nvidia-ml-py) is optional: without it, or without a GPU, everything reports CPU.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int
    used_bytes: int  # by every process on the device, as the driver counts it
    process_bytes: int  # by this process only


def gpu() -> Gpu | None:
    """The first visible CUDA device, or None (no NVML, no driver, or no device)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        mine = sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                   if p.pid == os.getpid())  # fmt: skip
        name = pynvml.nvmlDeviceGetName(handle)
        return Gpu(name if isinstance(name, str) else name.decode(), memory.total, memory.used, mine)
    except pynvml.NVMLError as error:
        log.debug("no GPU through NVML: %s", error)
        return None


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
