"""Type checks shared by every argument check (configs, settings, command-line options)."""
from __future__ import annotations


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
