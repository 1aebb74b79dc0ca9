"""Gated delta rule as a fused recurrence on Triton: the kernels for narrow heads and short segments.

One program per (sequence, head, V tile) walks its tokens in order with the state tile S (K x BV, float32) in
registers; the V columns of a delta-rule state evolve independently (u_t = beta_t (v_t - S^T k_t) is per column),
so V tiles need no communication. Per token, with q scaled and a_t = exp(g_t):

    S~ = a_t S;  u = beta (v - S~^T k);  S = S~ + k u^T;  o = S^T q                      (forward)

The forward stores S every CK tokens (checkpoints). The backward walks the CK-token blocks in reverse: it
recomputes S~ of each token of the block from its checkpoint into a per-program scratch, then runs the block
backwards with dS (the gradient of the state after the token):

    dS += q do^T;  dq = S do;  du = dS^T k;  dv = beta du;  dbeta = du . (v - S~^T k)
    dk = dS u - beta S~ du;  dS~ = dS - beta k du^T;  dg = sum(dS~ * S~);  dS = a_t dS~

O(T K V) work with no chunk algebra: at narrow heads (K <= 64) this beats the chunked WY form, whose per-chunk
(C x C) matrices cost as much at K = 16 as at K = 256. dq, dk, dbeta and dg sum over V: each V tile writes its
share into a float32 buffer (VT, ...) that the launcher sums.

Token-major layouts, as the chunked kernels: q, k (tokens, H, K); v, o (tokens, H, V); g, beta (tokens, H);
checkpoints (num_ckpt, H, K, V) float32; sequence n covers tokens [cu_seqlens[n], cu_seqlens[n + 1]) and owns
checkpoints ckpt_offsets[n] ... (one per started block of CK tokens).
"""
from __future__ import annotations

import triton
import triton.language as tl

from memmix.ops.triton.gated_delta_fwd import load_state_or_zeros


@triton.jit
def load_token(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t, live, i_h, kcols, vcols,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HAS_G: tl.constexpr):
    """Token t's q, k (BK,), v (BV,), beta and a = exp(g), float32; zeros (a = 1) where `live` is False."""
    row = i_h.to(tl.int64) + t * H  # int64 (the loop's t is a plain int under the interpreter)
    # the bounds as numbers, not `live & (cols < K)`: Triton's interpreter makes an integer mask of scalar & vector
    kmask = kcols < tl.where(live, K, 0)
    q = tl.load(q_ptr + row * K + kcols, mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row * K + kcols, mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * V + vcols, mask=vcols < tl.where(live, V, 0), other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + row, mask=live, other=0.0).to(tl.float32)
    if HAS_G:
        decay = tl.exp(tl.load(g_ptr + row, mask=live, other=0.0).to(tl.float32))
    else:
        decay = tl.full((), 1.0, tl.float32)
    return q, k, v, beta, decay


@triton.jit
def program_tile(cu_seqlens_ptr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr):
    """A program of the (V tiles, N x H) grid: its V tile i_v, row i_nh = (sequence i_n, head i_h), the sequence's
    tokens [bos, eos), the state tile's rows kcols and columns vcols, its mask and offsets in a (K, V) state."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int32)
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    state_mask = (kcols[:, None] < K) & (vcols[None, :] < V)
    state_offs = kcols[:, None] * V + vcols[None, :]
    return i_v, i_nh, i_n, i_h, bos, eos, kcols, vcols, state_mask, state_offs


@triton.jit
def recurrent_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, o_ptr, ckpt_ptr, ht_ptr,
                         cu_seqlens_ptr, ckpt_offsets_ptr, scale,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         CK: tl.constexpr, HAS_G: tl.constexpr, HAS_H0: tl.constexpr, STORE_CKPT: tl.constexpr,
                         STORE_FINAL: tl.constexpr):
    """Grid (V tiles, N x H): one sequence, head and V tile; o, the checkpoints and the final state."""
    i_v, i_nh, i_n, i_h, bos, eos, kcols, vcols, state_mask, state_offs = program_tile(cu_seqlens_ptr, H, K, V, BK,
                                                                                         BV)
    S = load_state_or_zeros(h0_ptr, i_nh, kcols, vcols, K, V, BK, BV, HAS_H0)
    first_ckpt = tl.load(ckpt_offsets_ptr + i_n).to(tl.int64)

    q, k, v, beta, decay = load_token(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, bos, bos < eos, i_h, kcols, vcols,
                                      H, K, V, HAS_G)
    for t in range(bos, eos):
        if STORE_CKPT:
            if (t - bos) % CK == 0:
                ckpt = (first_ckpt + (t - bos) // CK) * H + i_h
                tl.store(ckpt_ptr + ckpt * K * V + state_offs, S, mask=state_mask)
        # the next token's inputs load while this one computes (they do not depend on the state)
        q_n, k_n, v_n, beta_n, decay_n = load_token(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t + 1, t + 1 < eos, i_h,
                                                    kcols, vcols, H, K, V, HAS_G)
        S = S * decay
        u = beta * (v - tl.sum(S * k[:, None], 0))  # (BV,)
        S = S + k[:, None] * u[None, :]
        o = tl.sum(S * q[:, None], 0) * scale  # (BV,)
        tl.store(o_ptr + (i_h.to(tl.int64) + t * H) * V + vcols, o.to(o_ptr.dtype.element_ty), mask=vcols < V)
        q, k, v, beta, decay = q_n, k_n, v_n, beta_n, decay_n

    if STORE_FINAL:
        tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + state_offs, S, mask=state_mask)


@triton.jit
def recurrent_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, ckpt_ptr, do_ptr, dht_ptr,
                         dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, dh0_ptr, scratch_ptr,
                         cu_seqlens_ptr, ckpt_offsets_ptr, scale, num_tokens,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         CK: tl.constexpr, HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr):
    """Grid (V tiles, N x H): the gradients of one sequence, head and V tile, block by block in reverse.

    dq, dk (VT, tokens, H, K) and dbeta, dg (VT, tokens, H) float32 receive this V tile's share; dv (tokens, H, V)
    and dh0 (N, H, K, V) float32 their values. scratch: (programs, CK, BK, BV) float32, this program's S~ of a block.
    """
    i_v, i_nh, i_n, i_h, bos, eos, kcols, vcols, state_mask, state_offs = program_tile(cu_seqlens_ptr, H, K, V, BK,
                                                                                         BV)
    scratch = scratch_ptr + (i_nh.to(tl.int64) * tl.num_programs(0) + i_v) * (CK * BK * BV)
    scratch_offs = kcols[:, None] * BV + tl.arange(0, BV)[None, :]
    part = i_v.to(tl.int64) * num_tokens  # this V tile's rows of the (VT, tokens, ...) buffers
    dS = load_state_or_zeros(dht_ptr, i_nh, kcols, vcols, K, V, BK, BV, HAS_DHT)
    first_ckpt = tl.load(ckpt_offsets_ptr + i_n).to(tl.int64)

    num_blocks = tl.cdiv(eos - bos, CK)
    for jb in range(0, num_blocks):
        block = num_blocks - 1 - jb
        t0 = bos + block * CK
        t1 = tl.minimum(t0 + CK, eos)
        ckpt = (first_ckpt + block) * H + i_h
        S = tl.load(ckpt_ptr + ckpt * K * V + state_offs, mask=state_mask, other=0.0)
        # S~ of every token of the block, from its checkpoint, into the scratch
        _, k, v, beta, decay = load_token(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t0, t0 < t1, i_h, kcols, vcols,
                                          H, K, V, HAS_G)
        for t in range(t0, t1):
            _, k_n, v_n, beta_n, decay_n = load_token(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t + 1, t + 1 < t1, i_h,
                                                      kcols, vcols, H, K, V, HAS_G)
            S = S * decay
            tl.store(scratch + (t - t0) * (BK * BV) + scratch_offs, S)
            u = beta * (v - tl.sum(S * k[:, None], 0))
            S = S + k[:, None] * u[None, :]
            k, v, beta, decay = k_n, v_n, beta_n, decay_n
        tl.debug_barrier()  # the scratch is read back below by other threads of the program

        t = t1 - 1
        q, k, v, beta, decay = load_token(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t, t >= t0, i_h, kcols, vcols,
                                          H, K, V, HAS_G)
        do = tl.load(do_ptr + (i_h.to(tl.int64) + t * H) * V + vcols, mask=vcols < V, other=0.0).to(tl.float32)
        S = tl.load(scratch + (t - t0) * (BK * BV) + scratch_offs)
        for j in range(0, t1 - t0):
            t = t1 - 1 - j
            live = t - 1 >= t0
            q_n, k_n, v_n, beta_n, decay_n = load_token(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t - 1, live, i_h,
                                                        kcols, vcols, H, K, V, HAS_G)
            do_n = tl.load(do_ptr + (i_h.to(tl.int64) + (t - 1) * H) * V + vcols,
                           mask=vcols < tl.where(live, V, 0), other=0.0).to(tl.float32)
            S_n = tl.load(scratch + (t - 1 - t0) * (BK * BV) + scratch_offs,
                          mask=scratch_offs < tl.where(live, BK * BV, 0), other=0.0)
            r = v - tl.sum(S * k[:, None], 0)  # (BV,) v - S~^T k
            u = beta * r
            S_after = S + k[:, None] * u[None, :]
            row = i_h.to(tl.int64) + t * H
            dq = tl.sum(S_after * do[None, :], 1) * scale  # (BK,)
            dS = dS + (q * scale)[:, None] * do[None, :]
            du = tl.sum(dS * k[:, None], 0)  # (BV,)
            dk = tl.sum(dS * u[None, :] - beta * S * du[None, :], 1)  # (BK,)
            dS = dS - beta * k[:, None] * du[None, :]  # dS~
            tl.store(dq_ptr + (part * H + row) * K + kcols, dq, mask=kcols < K)
            tl.store(dk_ptr + (part * H + row) * K + kcols, dk, mask=kcols < K)
            tl.store(dv_ptr + row * V + vcols, (beta * du).to(dv_ptr.dtype.element_ty), mask=vcols < V)
            tl.store(dbeta_ptr + part * H + row, tl.sum(du * r, 0))
            if HAS_G:
                tl.store(dg_ptr + part * H + row, tl.sum(tl.sum(dS * S, 1), 0))
            dS = dS * decay
            q, k, v, beta, decay, do, S = q_n, k_n, v_n, beta_n, decay_n, do_n, S_n
        tl.debug_barrier()  # the next block overwrites the scratch

    if STORE_DH0:
        tl.store(dh0_ptr + i_nh.to(tl.int64) * K * V + state_offs, dS, mask=state_mask)
