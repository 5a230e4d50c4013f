"""Process memory readings shared by the benchmarks (Linux /proc, with a portable fallback).

Peak memory of a measured call = the resident high-water mark after it, minus the resident
size just before it, with the high-water mark reset first (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource

__all__ = ["high_water_bytes", "release_free_memory", "reset_high_water_mark", "rss_bytes"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water_bytes() -> tuple[int, str]:
    """The resident high-water mark of this process's address space, and where it was read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
