"""Progress bars that suit where they are written: a live tqdm bar on a terminal, plain lines in a file or pipe.

A tqdm bar redraws itself with carriage returns and cursor movements (`ESC [A`), which litter a log file; written
to anything but a terminal, the same calls print one plain line every 10% of the work (and at least once a
minute), and a last line at the end.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import IO

from tqdm import tqdm

_LINE_EVERY_S = 60.0


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 file: IO[str] | None = None):
    """A bar with tqdm's update / set_postfix / write / close; plain lines unless `file` (stderr) is a terminal."""
    file = file or sys.stderr
    if enabled and not _is_terminal(file):
        return LineProgress(total, desc, unit, initial, file)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                file=file)


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's interface, printing whole lines: `desc: 300/1000 step (30%), 1:23 elapsed, ~3:10 left, loss=2.3`."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, file: IO[str]):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n = self.start_n = initial
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.last_tenth, self.last_n = self._tenth(), None
        self.closed = False

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._tenth() > self.last_tenth or now - self.last_line >= _LINE_EVERY_S:
            self._line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, s: str, file: IO[str] | None = None, end: str = "\n", nolock: bool = False) -> None:
        """A line between progress lines (tqdm.write's signature)."""
        print(s, file=file or self.file, end=end, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.last_n:
                self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last_line, self.last_tenth, self.last_n = now, self._tenth(), self.n
        elapsed = now - self.start
        if self.total:
            parts = [f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)",
                     f"{tqdm.format_interval(elapsed)} elapsed"]
            done = self.n - self.start_n
            if 0 < done and self.n < self.total:
                parts.append(f"~{tqdm.format_interval(elapsed / done * (self.total - self.n))} left")
        else:
            parts = [f"{self.n:,} {self.unit}", f"{tqdm.format_interval(elapsed)} elapsed"]
        if self.postfix:
            parts.append(self.postfix)
        self.write(f"{self.desc}: " + ", ".join(parts))


@contextlib.contextmanager
def quiet_transformers_bars():
    """Hide transformers' own bars ("Loading weights", "Writing model shards") for a moment: they take no time for
    our models and would litter a log file."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
