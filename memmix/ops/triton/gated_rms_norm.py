"""Output-gated RMSNorm on Triton: y = x / rms(x) * weight * silu(gate), forward and backward in one pass each.

The PyTorch form (memmix.layers.norms) runs ~12 float32 elementwise passes over (tokens, heads, D) each way; here
each row is read once and written once. Rows are the flattened leading dims; D (the last) fits one tile.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from memmix.ops.triton import NORM_MAX_DIM as MAX_DIM, runtime



def _rows_per_program(block_d: int) -> int:
    """16 rows of D <= 512 per program (the MoM shapes), fewer for wider rows: ~8K float32 values per tile."""
    return max(1, min(16, 8192 // block_d))


@triton.jit
def gated_rms_norm_fwd_kernel(x_ptr, gate_ptr, w_ptr, y_ptr, rstd_ptr, num_rows, D, eps,
                              BR: tl.constexpr, BD: tl.constexpr):
    """Rows tile: y = x * rstd * w * silu(gate), rstd = 1 / sqrt(mean(x^2) + eps) stored (float32) per row."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < num_rows)[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    y = x * rstd[:, None] * w[None, :] * (g * tl.sigmoid(g))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < num_rows)


@triton.jit
def gated_rms_norm_bwd_kernel(x_ptr, gate_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dgate_ptr, dw_part_ptr, num_rows, D,
                              BR: tl.constexpr, BD: tl.constexpr):
    """Rows tile: dx, dgate, and this tile's share of dw (dw_part[tile, D])."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < num_rows)[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < num_rows, other=0.0)
    n = x * rstd[:, None]
    sig = tl.sigmoid(g)
    silu = g * sig
    dgate = dy * n * w[None, :] * sig * (1.0 + g * (1.0 - sig))
    dn = dy * w[None, :] * silu
    dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, 1) / D)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, tl.sum(dy * n * silu, 0), mask=cols < D)


def _options(D: int) -> dict:
    return {"num_warps": 4 if D <= 256 else 8}


class GatedRMSNormFunction(torch.autograd.Function):
    """x, gate (rows, D) contiguous, weight (D,) -> y (rows, D) like x."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        num_rows, D = x.shape
        y = torch.empty_like(x)
        rstd = torch.empty(num_rows, device=x.device, dtype=torch.float32)
        block_d = runtime.tile(D, floor=1)
        rows = _rows_per_program(block_d)
        if num_rows > 0:
            runtime.launch(gated_rms_norm_fwd_kernel, (triton.cdiv(num_rows, rows),),
                           (x, gate, weight, y, rstd, num_rows, D, eps), dict(BR=rows, BD=block_d), _options(D))
        ctx.save_for_backward(x, gate, weight, rstd)
        return y

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, dy):
        x, gate, weight, rstd = ctx.saved_tensors
        num_rows, D = x.shape
        block_d = runtime.tile(D, floor=1)
        rows = _rows_per_program(block_d)
        tiles = triton.cdiv(num_rows, rows)
        dx, dgate = torch.empty_like(x), torch.empty_like(gate)
        dw_part = torch.empty(tiles, D, device=x.device, dtype=torch.float32)
        if num_rows > 0:
            runtime.launch(gated_rms_norm_bwd_kernel, (tiles,),
                           (x, gate, weight, rstd, dy.contiguous(), dx, dgate, dw_part, num_rows, D),
                           dict(BR=rows, BD=block_d), _options(D))
        return dx, dgate, dw_part.sum(0).to(weight.dtype), None


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight * silu(gate), statistics in float32; differentiable.

    x, gate: (..., D) of one dtype, D <= 4096; weight: (D,). Returns y (..., D) in x's dtype.
    """
    D = x.shape[-1]
    if D > MAX_DIM or gate.shape != x.shape or weight.shape != (D,):
        raise ValueError(f"gated_rms_norm: x and gate must share a shape (..., D) with D <= {MAX_DIM} and weight "
                         f"(D,); got x {tuple(x.shape)}, gate {tuple(gate.shape)}, weight {tuple(weight.shape)}")
    y = GatedRMSNormFunction.apply(x.reshape(-1, D).contiguous(), gate.to(x.dtype).reshape(-1, D).contiguous(),
                                   weight.contiguous(), float(eps))
    return y.view(x.shape)
