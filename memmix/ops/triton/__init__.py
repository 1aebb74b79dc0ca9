"""Triton GPU kernels: the chunked gated delta rule (forward and backward; the delta rule is it without decay),
recurrent_step (one decoding step of any rule, in place in a state bank), the MoM mixer's segment convolution and
combine, and the fused output-gated RMSNorm.

Importing this package registers its kernels in memmix.ops.registry (when Triton is installed); memmix.ops finds
them there and never imports this package itself (the registry does, on its first lookup). Importing it never
imports Triton: the kernels load on first use.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from typing import Iterator, Optional

import torch

from memmix.ops.registry import Kernel, register_kernel, register_kernels

KERNEL_RULES = ("gated_delta_rule", "delta_rule")  # the rules with a chunked sequence kernel
STEP_RULES = ("gated_delta_rule", "delta_rule", "gated_linear_attention", "linear_attention")
MAX_HEAD_DIM = 256  # the largest q/k and v head dims of the chunked kernels
RECURRENT_MAX_K = 64  # heads up to this q/k width take the fused recurrent kernels (benchmarks/ops_gpu.py)
RECURRENT_KERNEL_MAX_K = 128  # the widest q/k head the recurrent kernels take (its whole K sits in registers)
STEP_MAX_K = 256  # the largest q/k head dim of recurrent_step (it holds the whole K of a state tile)
NORM_MAX_DIM = 4096  # the widest row of gated_rms_norm (one tile per row)
SEQUENCE_FORMS = ("chunked", "recurrent")
_FORCED_FORM: contextvars.ContextVar = contextvars.ContextVar("memmix_forced_sequence_form", default=None)


def triton_importable() -> bool:
    """True when the triton package is installed."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: Triton's CPU interpreter (tests) runs the kernels on CPU tensors. The one
    place that reads the switch (runtime.INTERPRET holds it for the launchers)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available(*tensors: torch.Tensor) -> bool:
    """True when Triton imports and the given tensors (or, with none given, the default device) are on CUDA.

    Under TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests) CPU tensors count too.
    """
    if not triton_importable():
        return False
    if interpreting():
        return True
    if not tensors:
        return torch.cuda.is_available()
    return all(x.is_cuda for x in tensors)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=False, low_memory=False):
    """Gated delta rule on the Triton kernels (g None: delta rule): the fused recurrent form for heads of at most
    RECURRENT_MAX_K, else the chunked form (see sequence_form)."""
    if sequence_form(q.shape[-1]) == "recurrent":
        from memmix.ops.triton.recurrent_delta_rule import recurrent_gated_delta_rule as run
    else:
        from memmix.ops.triton.gated_delta_rule import chunk_gated_delta_rule as run
    return run(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, low_memory=low_memory)


def sequence_form(head_k_dim: int) -> str:
    """"recurrent" (state in registers, O(T K V)) for q/k heads of at most RECURRENT_MAX_K, else "chunked" (WY form
    on the tensor cores, which pays for its per-chunk (C x C) algebra only at wide heads); inside forced_form, the
    form it names (the recurrent one only up to RECURRENT_KERNEL_MAX_K)."""
    limit = {None: RECURRENT_MAX_K, "chunked": 0, "recurrent": RECURRENT_KERNEL_MAX_K}[_FORCED_FORM.get()]
    return "recurrent" if head_k_dim <= limit else "chunked"


@contextlib.contextmanager
def forced_form(form: Optional[str]) -> Iterator[None]:
    """Inside the block the delta rules run on one form of the kernels, "chunked" or "recurrent" (None: chosen by
    head width, as outside), to test or time a form at head widths the choice would not give it."""
    if form is not None and form not in SEQUENCE_FORMS:
        raise ValueError(f"form must be None or one of {SEQUENCE_FORMS}, got {form!r}")
    token = _FORCED_FORM.set(form)
    try:
        yield
    finally:
        _FORCED_FORM.reset(token)


def _recurrent_step(q, k, v, g, beta, bank, index, keep, scale):
    """recurrent_step.recurrent_step, loaded on first use."""
    from memmix.ops.triton.recurrent_step import recurrent_step
    return recurrent_step(q, k, v, g, beta, bank, index, keep, scale)


def _mom_segment_conv(*args):
    """mom_segment_kernels.SegmentConvFunction.apply, loaded on first use (arguments: see that Function)."""
    from memmix.ops.triton.mom_segment_kernels import SegmentConvFunction
    return SegmentConvFunction.apply(*args)


def _mom_segment_combine(rows, slot_row, weight):
    """mom_segment_kernels.SegmentCombineFunction.apply, loaded on first use."""
    from memmix.ops.triton.mom_segment_kernels import SegmentCombineFunction
    return SegmentCombineFunction.apply(rows, slot_row, weight)


def _gated_rms_norm(x, gate, weight, eps):
    """gated_rms_norm.gated_rms_norm, loaded on first use."""
    from memmix.ops.triton.gated_rms_norm import gated_rms_norm
    return gated_rms_norm(x, gate, weight, eps)


def _register() -> None:
    chunk = Kernel(chunk_gated_delta_rule, runs_on=is_available, max_head_dim=MAX_HEAD_DIM)
    step = Kernel(_recurrent_step, runs_on=is_available, max_head_dim=STEP_MAX_K, differentiable=False)
    for rule in STEP_RULES:
        register_kernels(rule, chunk=chunk if rule in KERNEL_RULES else None, step=step)
    register_kernel("mom_segment_conv", Kernel(_mom_segment_conv, runs_on=is_available))
    register_kernel("mom_segment_combine", Kernel(_mom_segment_combine, runs_on=is_available))
    register_kernel("gated_rms_norm", Kernel(_gated_rms_norm, runs_on=is_available, max_head_dim=NORM_MAX_DIM))


if triton_importable():
    _register()

__all__ = ["KERNEL_RULES", "MAX_HEAD_DIM", "NORM_MAX_DIM", "STEP_MAX_K", "STEP_RULES", "chunk_gated_delta_rule",
           "is_available", "triton_importable"]
