"""The one device check of every command: syntax without torch, availability with it."""
from __future__ import annotations

import re

from memmix.errors import InputError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_device(value: str) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' (checked without importing torch); InputError otherwise."""
    if not _DEVICE.match(value):
        raise InputError(f"unknown device {value!r}; allowed: {DEVICE_NAMES}", argument="device")
    return value


def resolve_device(value: str = "auto", local_rank: int = 0):
    """The torch.device for a --device value: 'auto' is cuda:<local_rank> when a GPU is visible, else cpu.

    InputError (argument "device") for a malformed name or a GPU that is not there.
    """
    import torch

    parse_device(value)
    if value == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"{value!r} requested but no CUDA GPU is visible (torch.cuda.is_available() is False); "
                         "allowed here: auto, cpu", argument="device")
    index = local_rank if value == "cuda" else int(value.split(":")[1])
    if index >= torch.cuda.device_count():
        raise InputError(f"{value!r} requested but only {torch.cuda.device_count()} GPU(s) are visible",
                         argument="device")
    return torch.device("cuda", index)
