"""Resident memory of this process: its current size and a high-water mark that can be reset.

Linux keeps the process's peak resident set (VmHWM); writing 5 to /proc/self/clear_refs resets it,
after freed heap pages have been handed back to the kernel, so one process can measure the peak of
several pieces of work in turn. Where the reset is refused, ru_maxrss (the whole life) is the fallback.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def status_kib(field: str) -> int | None:
    """A "VmRSS"/"VmHWM"-style field of /proc/self/status in KiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def release_and_reset_peak() -> bool:
    """Return freed heap to the kernel, then reset the resident high-water mark; False if not allowed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_kib(reset_ok: bool) -> tuple[int, str]:
    """(peak resident KiB, how it was measured) since the last successful reset."""
    if reset_ok and status_kib("VmHWM") is not None:
        return status_kib("VmHWM"), "VmHWM since reset"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (whole process)"
