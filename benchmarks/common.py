"""Pieces every benchmark script shares: CPU timing and the atomic JSON write.

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path and `from common import ...` works.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time


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


def write_json_atomic(path: str, payload: dict) -> None:
    """Write payload as JSON to path: a temporary file in the same folder, then os.replace (readable by all)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
