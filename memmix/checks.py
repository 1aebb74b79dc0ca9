"""Argument checks shared across the package.

Type checks shared by every argument check (configs, settings, command-line options): is_int.

Checks of tensor values at the public boundary (token ids, labels, masks, log decays) that never stall the GPU.
A check of every element needs the values, and reading them on the host would synchronise it with an accelerator
every call. So each check is one `torch._assert_async` on the tensor's own device: on the CPU it raises at once (as
ValueError here); on CUDA it is queued as a device-side assert, which surfaces at the next synchronisation and leaves
the CUDA context unusable after it. It is left out while a CUDA graph is being captured.
"""
from __future__ import annotations

import torch


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_values(ok: torch.Tensor, message: str) -> None:
    """ok: bool tensor, True where a value is allowed. torch._assert_async(ok.all()): no host read on any device;
    on the CPU a failure is ValueError(message) at once, on CUDA a device-side assert (see the module docstring)."""
    if ok.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if ok.device.type != "cpu":
        torch._assert_async(ok.all(), message)
        return
    try:
        torch._assert_async(ok.all(), message)
    except RuntimeError:
        raise ValueError(message) from None


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, ignore_index: int | None = None) -> None:
    """ids: integer (B, T) with T >= 1 and every value in [0, vocab_size) (or == ignore_index)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor of token ids (int64), got {what}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, T) with T >= 1, got {tuple(ids.shape)}")
    ok = (ids >= 0) & (ids < vocab_size)
    if ignore_index is not None:
        ok |= ids == ignore_index
    allowed = f"[0, {vocab_size})" + (f" or {ignore_index}" if ignore_index is not None else "")
    check_values(ok, f"{name} must be token ids in {allowed} (the model's vocab_size is {vocab_size})")


def check_binary_mask(name: str, mask: torch.Tensor) -> None:
    """mask: bool, or numbers that are all 0 or 1 (a 0.5 would be read as 'keep' by one path and not another)."""
    if mask.dtype != torch.bool:
        check_values((mask == 0) | (mask == 1), f"{name} must hold only 0 and 1 (0 at padding)")


def check_log_decay(g: torch.Tensor | None, q: torch.Tensor) -> None:
    """g: log decay, every value <= 0 (a positive one grows the state without bound: inf outputs). Checked on the
    CPU only: the rule ops run inside every layer and every decoding step, where even a queued device-side check
    costs a kernel per call; the layers make g <= 0 by construction (-softplus)."""
    if not (isinstance(g, torch.Tensor) and isinstance(q, torch.Tensor) and g.shape == q.shape[:3]):
        return  # the op's own validation names a missing or misshapen g
    if g.device.type == "cpu" and g.is_floating_point():
        check_values(g <= 0, "g (log decay) must be <= 0 everywhere (exp(g) is the decay, in (0, 1])")


def describe(x) -> str:
    """What an argument is, for an error message: "torch.float32 tensor of shape (2, 3)", or its type's name."""
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{x.dtype} tensor of shape {tuple(x.shape)}"
