"""Process-level tuning for CPU inference: keep freed memory mapped, so big tensors reuse warm pages.

Each forward pass allocates and frees activation tensors of megabytes (logits alone are B·T·vocab
floats). glibc returns such blocks to the kernel when they are freed (mmap'd blocks, and a trimmed heap
top), so the next pass page-faults through them again: a cost paid on every forward, and more when
adapters add their own temporaries. Raising the trim threshold and the mmap threshold (to glibc's 32 MiB
limit) keeps that memory in the process for reuse. Blocks over 32 MiB (a long batch's logits) are still
mapped afresh each time. The price is that the process's resident size stays near its peak rather than
shrinking after a burst.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit systems


def keep_freed_memory(top_pad: int = 256 * 1024 * 1024) -> bool:
    """Tell glibc's malloc to keep freed memory for reuse. Returns False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # all three are needed: setting any of them switches off glibc's own adaptive threshold, which would
    # leave the mmap threshold at 128 KiB, so blocks of a few MB would still be unmapped on every free
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    ok &= mallopt(_M_TOP_PAD, top_pad)
    return bool(ok)


def in_fresh_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on a new thread that ends with it; its result, or its exception re-raised.

    For torch work done off a server's engine thread (loading the model, reading adapters). With GNU
    OpenMP every thread that runs a parallel torch op keeps its own team of worker threads for as long as
    it lives. Once the threads of all teams outnumber the cores, libgomp stops spinning between parallel
    regions and wakes its workers through the kernel, so every small op pays a wake-up: a decode step is
    hundreds of small ops (LoRA-XS's r×r products among them), so that cost would dominate it. A thread
    that has ended takes its team with it, so the engine's thread stays the only one with workers."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"lorakit-{getattr(fn, '__name__', 'work')}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
