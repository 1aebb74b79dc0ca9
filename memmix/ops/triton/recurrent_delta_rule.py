"""Gated delta rule on the fused recurrent Triton kernels (recurrent_delta_kernels.py): tiles, launches, autograd.

Same contract as gated_delta_rule.chunk_gated_delta_rule (packed token axis, dense or varlen, no host sync), for
narrow heads: memmix.ops.triton picks this form or the chunked one by head size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from memmix.ops.triton import RECURRENT_KERNEL_MAX_K as MAX_HEAD_DIM, runtime
from memmix.ops.triton.gated_delta_rule import packed_inputs
from memmix.ops.triton.recurrent_delta_kernels import recurrent_bwd_kernel, recurrent_fwd_kernel

CHECKPOINT_EVERY = 16  # tokens between stored states; the backward's scratch holds this many states a program


@dataclass(frozen=True)
class RecurrentConfig:
    """Tiles of the recurrent kernels: BV columns of v a program (the V tiles run in parallel) and its warps."""

    block_v: int
    num_warps: int


# (largest K, config) from benchmarks' config sweep on an H100 (2026-12-07, bf16, forward + backward at B=64 T=256
# H=8 K=V=16; B=64 T=256 H=2 K=V=64; B=8 T=2048 H=8 K=V=128; docs/benchmarks.md). At K = 16 every tile from 4 to
# 16 columns timed within 10% (the chain of each program sets the time, not its width).
CONFIGS = ((16, RecurrentConfig(4, 1)), (64, RecurrentConfig(32, 2)), (128, RecurrentConfig(8, 1)))


def default_config(K: int, V: int) -> RecurrentConfig:
    """The measured config of the narrowest CONFIGS row that covers K (V tiles never wider than V's power of two)."""
    config = next(c for k_max, c in CONFIGS if K <= k_max)
    return RecurrentConfig(runtime.tile(V, config.block_v, floor=4), config.num_warps)


class RecurrentDeltaRuleFunction(torch.autograd.Function):
    """Autograd over the recurrent kernels; inputs are (tokens, H, D) contiguous, g may be None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, layout, config, needs_grad):
        num_tokens, H, K = k.shape
        V = v.shape[-1]
        N = layout.num_seqs
        BK, BV = runtime.tile(K), config.block_v
        o = torch.empty_like(v)
        f32 = dict(device=k.device, dtype=torch.float32)
        ckpt = torch.empty(layout.num_chunks, H, K, V, **f32) if needs_grad else o
        ht = torch.empty(N, H, K, V, **f32) if output_final_state else o
        if N > 0:
            runtime.launch(
                recurrent_fwd_kernel, (triton.cdiv(V, BV), N * H),
                (q, k, v, beta if g is None else g, beta, o if initial_state is None else initial_state, o, ckpt, ht,
                 layout.cu_seqlens, layout.chunk_offsets, scale),
                dict(H=H, K=K, V=V, BK=BK, BV=BV, CK=layout.chunk_size, HAS_G=g is not None,
                     HAS_H0=initial_state is not None, STORE_CKPT=needs_grad, STORE_FINAL=output_final_state),
                {"num_warps": config.num_warps})
        ctx.save_for_backward(q, k, v, g, beta, ckpt)
        ctx.scale, ctx.layout, ctx.config = scale, layout, config
        ctx.has_h0 = initial_state is not None
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, ckpt = ctx.saved_tensors
        layout, config = ctx.layout, ctx.config
        num_tokens, H, K = k.shape
        V, N = v.shape[-1], layout.num_seqs
        BK, BV = runtime.tile(K), config.block_v
        VT = triton.cdiv(V, BV)
        f32 = dict(device=k.device, dtype=torch.float32)
        do = do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dq, dk = torch.empty(VT, num_tokens, H, K, **f32), torch.empty(VT, num_tokens, H, K, **f32)
        dbeta = torch.empty(VT, num_tokens, H, **f32)
        dg = torch.empty(VT, num_tokens, H, **f32) if g is not None else dbeta
        dv = torch.empty_like(v)
        dh0 = torch.empty(N, H, K, V, **f32) if ctx.has_h0 else dv
        scratch = torch.empty(N * H * VT * layout.chunk_size * BK * BV, **f32)
        if N > 0:
            runtime.launch(
                recurrent_bwd_kernel, (VT, N * H),
                (q, k, v, beta if g is None else g, beta, ckpt, do, do if dht is None else dht, dq, dk, dv, dbeta, dg,
                 dh0, scratch, layout.cu_seqlens, layout.chunk_offsets, ctx.scale, num_tokens),
                dict(H=H, K=K, V=V, BK=BK, BV=BV, CK=layout.chunk_size, HAS_G=g is not None, HAS_DHT=dht is not None,
                     STORE_DH0=ctx.has_h0),
                {"num_warps": config.num_warps})
        dq, dk, dbeta = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dbeta.sum(0).to(beta.dtype)
        dg = None if g is None else dg.sum(0).to(g.dtype)
        dh0 = dh0.to(ctx.h0_dtype) if ctx.has_h0 else None
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                               beta: torch.Tensor, scale: Optional[float] = None,
                               initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                               cu_seqlens: Optional[torch.Tensor] = None, use_qk_l2norm: bool = False,
                               low_memory: bool = False, config: Optional[RecurrentConfig] = None):
    """Gated delta rule (delta rule when g is None) on the fused recurrent Triton kernels; differentiable.

    q, k: (B, T, H, K); v: (B, T, H, V) bf16/fp16/fp32 with K <= MAX_HEAD_DIM; g: (B, T, H) log decay or None;
    beta: (B, T, H); initial_state: (N, H, K, V) or None; cu_seqlens: (N + 1,) int with B == 1, or None.
    low_memory is accepted for the common contract: this form holds only states every CHECKPOINT_EVERY tokens anyway.
    config: tiles and warps (default_config(K, V) when None).
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) float32 (None unless asked for).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_HEAD_DIM:
        raise ValueError(f"q/k head dim must be <= {MAX_HEAD_DIM} for the recurrent Triton kernels, got K={K}")
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state))
    tensors, scale, h0, layout = packed_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
                                               CHECKPOINT_EVERY)
    o, ht = RecurrentDeltaRuleFunction.apply(*tensors, scale, h0, output_final_state, layout,
                                             config or default_config(K, V), needs_grad)
    return o.reshape(B, T, H, V).to(v.dtype), ht
