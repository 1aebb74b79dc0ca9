"""The error type for bad user input (missing data, corrupt shards, mismatched configs, bad arguments).

The `memmix` command prints these as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: the message names the problem and the fix.

    `argument`, when given, is the library argument at fault (e.g. "window", "temperature"); the message then
    reads "argument: detail", and the command line shows the flag instead (`memmix` maps names to flags).
    """

    def __init__(self, detail: str, argument: str | None = None):
        super().__init__(f"{argument}: {detail}" if argument else detail)
        self.argument = argument
        self.detail = detail
