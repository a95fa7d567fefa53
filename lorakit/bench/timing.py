"""Interleaved timing: every case runs once per round, rounds repeat, medians are reported.

Interleaving spreads machine noise (other processes, thermal drift) evenly over the cases, so
ratios taken within one run are fair even on a busy machine.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per case over `repeats` rounds, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def per_call(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """Median seconds of one call, timing `calls` calls together (for microsecond operations)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)
