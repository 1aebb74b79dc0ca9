"""Triton GPU kernels for the memory rules (chunked gated delta rule, forward and backward; recurrent_step,
one decoding step of any rule in place in a state bank, used by memmix.ops.decode).

The hook for memmix.ops: `get_kernel(rule)` returns the kernel of a rule, or None when Triton is missing or
the rule has no kernel. Kernels take the public op's arguments with `scale` resolved:

    kernel(q, k, v[, g], beta, scale=..., initial_state=..., output_final_state=..., cu_seqlens=...,
           use_qk_l2norm=...) -> (o, final_state)

Importing this package never imports Triton; the kernels load on first use.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from typing import Callable, Iterator, Optional

import torch

KERNEL_RULES = ("gated_delta_rule", "delta_rule")
STEP_MAX_K = 256  # the largest q/k head dim of recurrent_step (it holds the whole K of a state tile)
NORM_MAX_DIM = 4096  # the widest row of gated_rms_norm (one tile per row)


_LOW_MEMORY_RECURRENCE = contextvars.ContextVar("memmix_low_memory_recurrence", default=False)


@contextlib.contextmanager
def low_memory_recurrence(enabled: bool = True) -> Iterator[None]:
    """Inside, the chunked rules run one head at a time, forward and backward: the per-chunk states, their
    gradients and the WY scratch are held for one head (least memory; the sequential kernels get fewer programs).
    The choice is made at the forward, and its backward follows it even when it runs outside."""
    token = _LOW_MEMORY_RECURRENCE.set(bool(enabled))
    try:
        yield
    finally:
        _LOW_MEMORY_RECURRENCE.reset(token)


def low_memory_recurrence_enabled() -> bool:
    """True inside low_memory_recurrence()."""
    return _LOW_MEMORY_RECURRENCE.get()


def triton_importable() -> bool:
    """True when the triton package is installed."""
    return importlib.util.find_spec("triton") is not None


def is_available(*tensors: torch.Tensor) -> bool:
    """True when Triton imports and the given tensors (or, with none given, the default device) are on CUDA.

    Under TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests) CPU tensors count too.
    """
    if not triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if not tensors:
        return torch.cuda.is_available()
    return all(x.is_cuda for x in tensors)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=False):
    """Gated delta rule on the Triton kernels (g None: delta rule); see gated_delta_rule.chunk_gated_delta_rule."""
    from memmix.ops.triton.gated_delta_rule import chunk_gated_delta_rule as run
    return run(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)


def _gated_delta_rule_kernel(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, use_qk_l2norm=False):
    """memmix.ops kernel contract for the gated delta rule."""
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                  use_qk_l2norm)


def _delta_rule_kernel(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
                       cu_seqlens=None, use_qk_l2norm=False):
    """memmix.ops kernel contract for the delta rule (no decay)."""
    return chunk_gated_delta_rule(q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens,
                                  use_qk_l2norm)


def get_kernel(rule: str) -> Optional[Callable]:
    """The Triton kernel for `rule`, or None when Triton is not installed or the rule has no kernel."""
    if rule not in KERNEL_RULES or not triton_importable():
        return None
    return _gated_delta_rule_kernel if rule == "gated_delta_rule" else _delta_rule_kernel


__all__ = ["KERNEL_RULES", "NORM_MAX_DIM", "STEP_MAX_K", "chunk_gated_delta_rule", "get_kernel", "is_available",
           "low_memory_recurrence", "low_memory_recurrence_enabled"]
