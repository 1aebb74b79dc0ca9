"""Pieces every benchmark script shares: CPU timing, the device's name, `--only` selection and the atomic JSON write
(memmix.files).

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path and `from common import ...` works.
"""
from __future__ import annotations

import os
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


def device_name(device: str) -> str:
    """The GPU's name for "cuda", else "CPU (N cores)": every results file says what measured it."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def only_matching(named: dict, only: str) -> dict:
    """The entries of `named` whose names contain one of the comma-separated substrings of `only` (all if empty)."""
    if not only:
        return named
    keep = [s.strip() for s in only.split(",")]
    return {name: value for name, value in named.items() if any(s in name for s in keep)}
