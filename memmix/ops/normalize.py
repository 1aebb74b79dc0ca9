"""L2 normalisation of queries and keys, shared by the memory rules, the MoM mixer and the Triton kernels.

A leaf module: it imports no other memmix module, so every op and kernel module may import it.
"""
from __future__ import annotations

import torch

from memmix.ops.dtypes import compute_dtype

L2NORM_EPS = 1e-6  # inside the root: x / sqrt(sum(x^2) + eps); the Triton kernels use the same value


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) along the last dim, computed in >= float32; returns x's dtype.

    x: (..., D) any floating dtype.
    """
    xf = x.to(compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)
