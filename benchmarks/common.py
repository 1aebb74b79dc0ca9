"""Pieces every benchmark script shares: CPU timing and the atomic JSON write (memmix.files).

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path and `from common import ...` works.
"""
from __future__ import annotations

import statistics
import time

from memmix.files import atomic_write_json  # noqa: F401  (re-exported for the scripts)


def cpu_median_ms(fn, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
