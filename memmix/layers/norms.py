"""Normalisation layers shared by the blocks: RMSNorm and the output-gated RMSNorm of MoM."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memmix.ops import triton as triton_ops
from memmix.ops.common import compute_dtype

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim of x (..., D) and scale by weight (D,), in at least float32."""
    xf = x.to(compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim: y = x / rms(x) * weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """RMSNorm followed by an output gate: y = rmsnorm(x) * weight * silu(gate); x, gate: (..., D).

    On CUDA with Triton (16/32-bit floats) one fused kernel each way (memmix.ops.triton.gated_rms_norm)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and x.dtype in _FUSED_DTYPES and x.shape == gate.shape and x.shape[-1] <= triton_ops.NORM_MAX_DIM
                and triton_ops.is_available(x)):
            from memmix.ops.triton.gated_rms_norm import gated_rms_norm

            return gated_rms_norm(x, gate, self.weight, self.eps)
        y = rms_norm(x, self.weight, self.eps)
        gf = gate.to(compute_dtype(gate.dtype))
        return (y.to(gf.dtype) * F.silu(gf)).to(x.dtype)
