"""The error type for bad user input (missing data, corrupt shards, mismatched configs).

The `memmix` command prints these as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
