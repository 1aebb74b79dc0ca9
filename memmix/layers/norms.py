"""Normalisation layers shared by the blocks: RMSNorm and the output-gated RMSNorm of MoM."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memmix.ops.dtypes import compute_dtype
from memmix.ops.registry import find_kernel


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

    On CUDA, where the fused kernel fits (Triton, 16/32-bit floats, rows up to its width), one kernel each way
    (memmix.ops.triton.gated_rms_norm)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        kernel = find_kernel("gated_rms_norm")
        if (x.is_cuda and x.shape == gate.shape and kernel is not None
                and kernel.fits(x, gate, self.weight, head_dim=x.shape[-1])):
            return kernel.fn(x, gate, self.weight, self.eps)
        y = rms_norm(x, self.weight, self.eps)
        gf = gate.to(compute_dtype(gate.dtype))
        return (y.to(gf.dtype) * F.silu(gf)).to(x.dtype)
