"""Chunked gated delta rule on Triton kernels: launch configuration, chunk layout and the autograd Function.

Every call runs on a packed token axis: a dense (B, T) batch is B sequences of length T, a varlen batch
(B == 1) is the sequences that cu_seqlens bounds. The chunk grid is sized from host-side upper bounds and
filled on the device (no host sync).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from memmix.ops.triton.gated_delta_bwd import chunk_grads_kernel, state_grad_kernel
from memmix.ops.triton.gated_delta_fwd import chunk_output_kernel, state_pass_kernel, wy_prepare_kernel

CHUNK_SIZE = 64
MAX_HEAD_DIM = 256
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------- configuration

def _tile(dim: int, cap: int) -> int:
    """Power-of-two tile covering up to `cap` of a dimension of size `dim` (tl.dot needs >= 16)."""
    return min(cap, max(16, triton.next_power_of_2(dim)))


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products; 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _state_config(K: int, V: int) -> dict:
    """Tiles and warps for the sequential kernels: the whole K in one tile, V split for parallelism."""
    block_k = _tile(K, MAX_HEAD_DIM)
    block_v = _tile(V, 64 if block_k <= 64 else 32)
    return {"BK": block_k, "BV": block_v, "num_warps": 4 if block_k <= 64 else 8, "num_stages": 2}


def _chunk_config(K: int, V: int) -> dict:
    """Tiles and warps for the per-chunk kernels."""
    return {"BK": _tile(K, 64), "BV": _tile(V, 64), "num_warps": 4 if max(K, V) <= 64 else 8}


def _fallbacks(config: dict) -> list[dict]:
    """The config, then lighter ones to try when it needs more shared memory or registers than the GPU has."""
    lighter = [config, dict(config, num_stages=1)]
    if config.get("BV", 16) > 16:
        lighter.append(dict(config, num_stages=1, BV=config["BV"] // 2))
    return lighter


_CHOSEN: dict = {}  # (kernel, shape/flag key) -> the config that launched


def _launch(kernel, grid, args: tuple, constants: dict, config: dict) -> None:
    """Launch `kernel[grid(config)](*args, **constants, **config)`, stepping down the fallbacks on OutOfResources.

    grid: a function of the config (tiles decide the grid). In interpret mode GPU-only options are dropped.
    """
    if INTERPRET:
        options = {key: value for key, value in config.items() if key not in ("num_warps", "num_stages")}
        kernel[grid(options)](*args, **constants, **options)
        return
    from triton.runtime.errors import OutOfResources

    key = (id(kernel), str(args[1].dtype), tuple(sorted(constants.items())), tuple(sorted(config.items())))
    candidates = [_CHOSEN[key]] if key in _CHOSEN else _fallbacks(config)
    for i, candidate in enumerate(candidates):
        try:
            kernel[grid(candidate)](*args, **constants, **candidate)
        except OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _CHOSEN[key] = candidate
        return


# --------------------------------------------------------------------------- chunk layout

class ChunkLayout:
    """Where the chunks of a packed batch are, computed on the device.

    cu_seqlens: (N + 1,) int64 sequence bounds; chunk_offsets: (N + 1,) index of each sequence's first chunk;
    chunk_start, chunk_end: (num_chunks,) int32 token bounds per chunk slot (start == end: unused slot).
    max_seq_len: host-side upper bound on the longest sequence (T for a dense batch, all tokens for varlen).
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seq_len: int, num_chunks_bound: int):
        C = CHUNK_SIZE
        self.cu_seqlens = cu_seqlens
        self.num_seqs = cu_seqlens.numel() - 1
        self.num_chunks = num_chunks_bound
        self.max_seq_len = max_seq_len
        counts = (cu_seqlens[1:] - cu_seqlens[:-1] + C - 1) // C  # (N,)
        self.chunk_offsets = torch.cat([cu_seqlens.new_zeros(1), counts.cumsum(0)])  # (N + 1,)
        slot = torch.arange(num_chunks_bound, device=cu_seqlens.device)
        seq = torch.searchsorted(self.chunk_offsets[1:].contiguous(), slot, right=True)  # (num_chunks,)
        seq_clamped = seq.clamp(max=self.num_seqs - 1)
        start = cu_seqlens[seq_clamped] + (slot - self.chunk_offsets[seq_clamped]) * C
        end = torch.minimum(start + C, cu_seqlens[seq_clamped + 1])
        used = seq < self.num_seqs
        self.chunk_start = torch.where(used, start, 0).to(torch.int32)
        self.chunk_end = torch.where(used, end, 0).to(torch.int32)

    @classmethod
    def build(cls, batch: int, seq_len: int, cu_seqlens: Optional[torch.Tensor], device) -> "ChunkLayout":
        """Dense batch (cu_seqlens None): B sequences of length T; else the packed sequences of cu_seqlens."""
        C = CHUNK_SIZE
        if cu_seqlens is None:
            cu = torch.arange(batch + 1, device=device, dtype=torch.int64) * seq_len
            return cls(cu, seq_len, batch * triton.cdiv(seq_len, C))
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        num_seqs = cu.numel() - 1
        return cls(cu, seq_len, (seq_len + num_seqs * (C - 1)) // C)  # sum ceil(L_i / C) <= this


# --------------------------------------------------------------------------- launchers

def _prepare(q, k, v, g, beta, scale, layout):
    """b (tokens, H) float32, T and M (tokens, H, C) like k, W like k, U0 like v.

    T and M are stored in k's dtype: every kernel that reads them casts them to it before its dot anyway."""
    num_tokens, H, K = k.shape
    V = v.shape[-1]
    b = torch.empty(num_tokens, H, device=k.device, dtype=torch.float32) if g is not None else beta
    tinv = torch.empty(num_tokens, H, CHUNK_SIZE, device=k.device, dtype=k.dtype)
    m = torch.empty_like(tinv)
    w, u0 = torch.empty_like(k), torch.empty_like(v)
    if layout.num_chunks > 0:
        _launch(wy_prepare_kernel, lambda cfg: (layout.num_chunks, H),
                (q, k, v, g if g is not None else beta, beta, b, tinv, m, w, u0,
                 layout.chunk_start, layout.chunk_end, scale),
                dict(H=H, K=K, V=V, C=CHUNK_SIZE, HAS_G=g is not None, PREC=_dot_precision(k.dtype)),
                dict(_chunk_config(K, V), num_stages=1))  # no pipelining: see wy_prepare_kernel's K loop
    return b, tinv, m, w, u0


def _state_pass(q, k, w, u0, b, m, h0, scale, layout, *, has_g, output_in_loop, store_final):
    """Sequential pass over the chunks: (o, states, u, final state), the unused ones None.

    output_in_loop: o is computed inside the pass; else the per-chunk incoming states (chunks, H, K, V) like k
    and U (like v) are stored, for chunk_output_kernel or the backward.
    """
    num_tokens, H, K = k.shape
    V = u0.shape[-1]
    N = layout.num_seqs
    o = torch.empty_like(u0) if output_in_loop else None
    states = None if output_in_loop else k.new_empty(layout.num_chunks, H, K, V)
    u = None if output_in_loop else torch.empty_like(u0)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if store_final else None
    dummy = u0
    _launch(state_pass_kernel, lambda cfg: (N, H, triton.cdiv(V, cfg["BV"])),
            (q, k, w, u0, b, m, h0 if h0 is not None else dummy, o if o is not None else dummy,
             states if states is not None else dummy, u if u is not None else dummy,
             ht if ht is not None else dummy, layout.cu_seqlens, layout.chunk_offsets, scale),
            dict(H=H, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, HAS_H0=h0 is not None, STORE_FINAL=store_final,
                 OUTPUT=output_in_loop, STORE_STATES=not output_in_loop, PREC=_dot_precision(k.dtype)),
            _state_config(K, V))
    return o, states, u, ht


def _output(q, b, m, states, u, scale, layout, *, has_g):
    """o (like u) of every chunk in parallel from the stored per-chunk states and U."""
    num_tokens, H, K = q.shape
    V = u.shape[-1]
    o = torch.empty_like(u)
    if layout.num_chunks > 0:
        _launch(chunk_output_kernel, lambda cfg: (layout.num_chunks, H, triton.cdiv(V, cfg["BV"])),
                (q, b, m, states, u, o, layout.chunk_start, layout.chunk_end, scale),
                dict(H=H, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, PREC=_dot_precision(q.dtype)),
                _chunk_config(K, V))
    return o


def _state_grad(q, k, w, b, m, do, dht, scale, layout, *, has_g, want_dh0):
    """Backward sequential pass: dU (like v), per-chunk dS' (like the states), dS0 (N, H, K, V) float32."""
    num_tokens, H, K = k.shape
    V = do.shape[-1]
    N = layout.num_seqs
    du = torch.empty_like(do)
    dstates = k.new_empty(layout.num_chunks, H, K, V)
    dh0 = k.new_empty(N, H, K, V, dtype=torch.float32) if want_dh0 else None
    _launch(state_grad_kernel, lambda cfg: (N, H, triton.cdiv(V, cfg["BV"])),
            (q, k, w, b, m, do, dht if dht is not None else do, du, dstates, dh0 if dh0 is not None else do,
             layout.cu_seqlens, layout.chunk_offsets, scale),
            dict(H=H, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, HAS_DHT=dht is not None, STORE_DH0=want_dh0,
                 PREC=_dot_precision(k.dtype)),
            _state_config(K, V))
    return du, dstates, dh0


def _chunk_grads(q, k, v, beta, b, tinv, u, du, do, states, dstates, scale, layout, *, has_g):
    """dq, dk (like k), dv (like v), dbeta and dg (tokens, H) float32."""
    num_tokens, H, K = k.shape
    V = v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty(num_tokens, H, device=k.device, dtype=torch.float32)
    dg = torch.empty_like(dbeta) if has_g else None
    if layout.num_chunks > 0:
        _launch(chunk_grads_kernel, lambda cfg: (layout.num_chunks, H),
                (q, k, v, beta, b, tinv, u, du, do, states, dstates, dq, dk, dv, dbeta,
                 dg if dg is not None else dbeta, layout.chunk_start, layout.chunk_end, scale),
                dict(H=H, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, PREC=_dot_precision(k.dtype)),
                _chunk_config(K, V))
    return dq, dk, dv, dbeta, dg


# --------------------------------------------------------------------------- autograd

class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Autograd over the packed kernels; inputs are (tokens, H, D) contiguous, g may be None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, layout):
        has_g = g is not None
        b, tinv, m, w, u0 = _prepare(q, k, v, g, beta, scale, layout)
        # O = diag(scale exp(b)) Q S + M U needs each chunk's incoming state S. Inside the sequential pass it doubles
        # the dots of every step of the chain (and adds Q and M, ~40% of its loads at K = V = 256); storing S (K x V
        # per chunk, in k's dtype like the backward recompute) and U moves it to a parallel kernel. With at most one
        # chunk per sequence there is no chain to shorten, so the pass computes O itself and writes no states.
        in_loop = layout.max_seq_len <= CHUNK_SIZE
        o, states, u, ht = _state_pass(q, k, w, u0, b, m, initial_state, scale, layout, has_g=has_g,
                                       output_in_loop=in_loop, store_final=output_final_state)
        if not in_loop:
            o = _output(q, b, m, states, u, scale, layout, has_g=has_g)
        ctx.save_for_backward(q, k, v, beta, initial_state, b, tinv, m, w, u0)
        ctx.scale, ctx.layout, ctx.has_g = scale, layout, has_g
        ctx.g_dtype = None if g is None else g.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, h0, b, tinv, m, w, u0 = ctx.saved_tensors
        scale, layout, has_g = ctx.scale, ctx.layout, ctx.has_g
        do = do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        _, states, u, _ = _state_pass(q, k, w, u0, b, m, h0, scale, layout, has_g=has_g, output_in_loop=False,
                                      store_final=False)
        du, dstates, dh0 = _state_grad(q, k, w, b, m, do, dht, scale, layout, has_g=has_g,
                                       want_dh0=h0 is not None)
        dq, dk, dv, dbeta, dg = _chunk_grads(q, k, v, beta, b, tinv, u, du, do, states, dstates, scale, layout,
                                             has_g=has_g)
        dg = None if dg is None else dg.to(ctx.g_dtype)
        dh0 = None if dh0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, dg, dbeta.to(beta.dtype), None, dh0, None, None


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                           beta: torch.Tensor, scale: Optional[float] = None,
                           initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                           cu_seqlens: Optional[torch.Tensor] = None, use_qk_l2norm: bool = False):
    """Gated delta rule (delta rule when g is None) on the chunked Triton kernels; differentiable.

    q, k: (B, T, H, K); v: (B, T, H, V) bf16/fp16/fp32 with K, V <= 256; g: (B, T, H) log decay or None;
    beta: (B, T, H); initial_state: (N, H, K, V) or None; cu_seqlens: (N + 1,) int with B == 1, or None.
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) float32 (None unless asked for).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"q/k and v head dims must be <= {MAX_HEAD_DIM} for the Triton kernels, got K={K}, V={V}")
    if use_qk_l2norm:
        from memmix.ops.common import l2norm
        q, k = l2norm(q), l2norm(k)
    scale = K ** -0.5 if scale is None else float(scale)
    layout = ChunkLayout.build(B, T, cu_seqlens, q.device)

    def packed(x):
        return None if x is None else x.reshape((B * T,) + tuple(x.shape[2:])).contiguous()

    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = ChunkGatedDeltaRuleFunction.apply(packed(q), packed(k), packed(v.to(q.dtype)), packed(g),
                                              packed(beta), scale, h0, output_final_state, layout)
    return o.reshape(B, T, H, V).to(v.dtype), ht
