"""One recurrent step of a memory rule, read from and written back into a state bank in place (decoding).

Per picked slot n, head h and state S = bank[index[n], h] (K x V, float32), with q and k L2-normalised:

    gated_delta_rule        S = exp(g) S;  S = S + k (beta (v - S^T k))^T;  o = S^T (scale q)
    delta_rule              as gated_delta_rule without the decay
    gated_linear_attention  S = exp(g) S + k v^T;                      o = S^T (scale q)
    linear_attention        S = S + k v^T;                             o = S^T (scale q)

Every rule works column by column of S (the delta prediction S^T k restricted to columns c needs S[:, c]
only), so recurrent_step_kernel's grid is (N, H, V tiles): each program loads q, k (the whole K) and its
K x BV block of S once, updates it in registers and stores it once, only where keep[n]. The step is bound by
memory traffic (each picked state read once and written once); BV = 32 at K = 256 (BV = 64 up to K = 128) with
4 warps keeps the K x BV float32 tile in registers and came close to the best tile and warp choice for every rule
(benchmarks/generation.py measures whole decode steps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memmix.ops.normalize import L2NORM_EPS
from memmix.ops.triton import STEP_MAX_K, runtime


@triton.jit
def recurrent_step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, bank_ptr, index_ptr, keep_ptr, o_ptr,
                          scale, eps, H, K, V, stride_slot, stride_head, stride_k, stride_v,
                          BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr):
    """Grid (N, H, cdiv(V, BV)). q, k (N, H, K), v and o (N, H, V), g and beta (N, H) contiguous; bank
    (slots, H, K, V) float32 with the given strides; index (N,) int; keep (N,) uint8."""
    n, h, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = n.to(tl.int64) * H + h  # (n, h) in the contiguous inputs
    rows = tl.arange(0, BK)
    cols = j * BV + tl.arange(0, BV)
    row_ok, col_ok = rows < K, cols < V

    q = tl.load(q_ptr + row * K + rows, mask=row_ok, other=0.0).to(tl.float32)  # (BK,)
    k = tl.load(k_ptr + row * K + rows, mask=row_ok, other=0.0).to(tl.float32)  # (BK,)
    v = tl.load(v_ptr + row * V + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BV,)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + eps) * scale
    k = k * tl.rsqrt(tl.sum(k * k, 0) + eps)

    slot = tl.load(index_ptr + n).to(tl.int64)
    state_ptr = bank_ptr + slot * stride_slot + h * stride_head
    offs = rows[:, None] * stride_k + cols[None, :] * stride_v
    tile_ok = row_ok[:, None] & col_ok[None, :]
    state = tl.load(state_ptr + offs, mask=tile_ok, other=0.0)  # (BK, BV)

    if HAS_G:
        state = state * tl.exp(tl.load(g_ptr + row).to(tl.float32))
    if HAS_BETA:  # delta update: write beta (v - prediction) instead of v
        beta = tl.load(beta_ptr + row).to(tl.float32)
        v = beta * (v - tl.sum(k[:, None] * state, 0))
    state = state + k[:, None] * v[None, :]
    o = tl.sum(q[:, None] * state, 0)  # (BV,) read after the update, as the step loop does

    tl.store(o_ptr + row * V + cols, o.to(o_ptr.dtype.element_ty), mask=col_ok)
    if tl.load(keep_ptr + n) != 0:
        tl.store(state_ptr + offs, state, mask=tile_ok)


def _block_v(K: int, V: int) -> int:
    """Columns per program: the K x BV float32 tile stays within 8K elements (64 registers a thread at 4 warps)."""
    return runtime.tile(V, 64 if K <= 128 else 32)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g, beta, bank: torch.Tensor,
                   index: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """One step of the rule given by (g is not None, beta is not None) for N picked slots, bank updated in place.

    q, k: (N, H, K); v: (N, H, V), one float dtype; g: (N, H) log decay or None; beta: (N, H) or None;
    bank: (slots, H, K, V) float32 (any strides), K <= STEP_MAX_K (the whole K sits in registers), any V;
    index: (N,) int, no value twice (each program owns its states: duplicates would race); keep: (N,) bool,
    False leaves bank[index[n]] untouched.
    Returns o (N, H, V) in q's dtype.
    """
    N, H, K = q.shape
    V = v.shape[-1]
    if K > STEP_MAX_K:
        raise ValueError(f"the q/k head dim must be <= {STEP_MAX_K} for the Triton step kernel, got K={K}")
    o = torch.empty(N, H, V, device=q.device, dtype=q.dtype)
    if N == 0:
        return o
    block_k, block_v = runtime.tile(K), _block_v(K, V)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = None if g is None else g.contiguous()
    beta = None if beta is None else beta.contiguous()
    runtime.launch(recurrent_step_kernel, (N, H, triton.cdiv(V, block_v)),
                   (q, k, v, g if g is not None else q, beta if beta is not None else q, bank, index.contiguous(),
                    keep.contiguous().view(torch.uint8), o, float(scale), L2NORM_EPS, H, K, V, *bank.stride()),
                   dict(BK=block_k, BV=block_v, HAS_G=g is not None, HAS_BETA=beta is not None), {"num_warps": 4})
    return o
