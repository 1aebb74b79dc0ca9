"""Backward Triton kernels of the chunked gated delta rule (notation of gated_delta_fwd).

With dO the output gradient and dS' the gradient of the state leaving a chunk:

    dU  = M^T dO + diag(exp(b_C - b)) K dS'                          (state_grad_kernel, sequential)
    dS  = exp(b_C) dS' + Q^T diag(scale exp(b)) dO - W^T dU           (gradient of the incoming state)

and, per chunk in parallel (chunk_grads_kernel), with Y = T^T dU:

    dv = beta Y,  dA = -strict_lower(Y U^T)   (because (I + A) U = beta V - diag(beta exp(b)) K S),
    dq = diag(scale exp(b)) dO S^T + (dO U^T * G * scale) K,
    dk = (dO U^T * G * scale)^T Q + diag(exp(b_C - b)) U dS'^T + diag(beta exp(b)) T^T (-dU S^T)
         + diag(beta) P K + P^T diag(beta) K,               P = dA * G,
    d beta, d b from the same terms; dg is the reverse cumulative sum of d b plus d b_C.
"""
from __future__ import annotations

import triton
import triton.language as tl

from memmix.ops.triton.gated_delta_fwd import (chunk_decay, chunk_rows, load_state, load_tile, sequence_chunk,
                                              sequence_program, store_state, store_tile)


@triton.jit
def state_grad_kernel(q_ptr, k_ptr, w_ptr, b_ptr, m_ptr, do_ptr, dht_ptr, du_ptr, dstates_ptr, dh0_ptr,
                      cu_seqlens_ptr, chunk_offsets_ptr, seq_order_ptr, scale, head0,
                      H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_DHT: tl.constexpr,
                      STORE_DH0: tl.constexpr, WY_LOCAL: tl.constexpr, PREC: tl.constexpr):
    """One sequence, head and V tile: walk the chunks backwards carrying dS; store dS' per chunk and dU
    (for the HS heads from head0 on, as state_pass_kernel; W too when WY_LOCAL)."""
    i_n, i_hs, i_h, i_wy, nh, bos, eos, first_chunk, rows, kcols, vcols, dstate = sequence_program(
        seq_order_ptr, cu_seqlens_ptr, chunk_offsets_ptr, dht_ptr, head0, H, HS, K, V, C, BK, BV, WY_LOCAL, HAS_DHT)
    WYH = HS if WY_LOCAL else H
    dt = k_ptr.dtype.element_ty

    num_chunks = tl.cdiv(eos - bos, C)
    for jj in range(0, num_chunks):
        j = num_chunks - 1 - jj
        tok, valid, b, b_last = sequence_chunk(b_ptr + i_h, bos, eos, j, H, C, HAS_G)
        chunk_head = (first_chunk + j) * HS + i_hs
        store_state(dstates_ptr + chunk_head * K * V, dstate, kcols, vcols, K, V)
        m = load_tile(m_ptr + i_h * C, tok, valid, H * C, rows, C).to(dt)  # (C, C)
        do = load_tile(do_ptr + i_h * V, tok, valid, H * V, vcols, V)  # (C, BV)
        k = load_tile(k_ptr + i_h * K, tok, valid, H * K, kcols, K)  # (C, BK)
        k_to_end = (k * tl.exp(b_last - b)[:, None]).to(dt)
        du = tl.dot(tl.trans(m), do.to(dt), input_precision=PREC)
        du += tl.dot(k_to_end, dstate.to(dt), input_precision=PREC)  # (C, BV)
        store_tile(du_ptr + i_hs * V, du, tok, valid, HS * V, vcols, V)
        q = load_tile(q_ptr + i_h * K, tok, valid, H * K, kcols, K)
        w = load_tile(w_ptr + i_wy * K, tok, valid, WYH * K, kcols, K).to(dt)
        q_scaled = (q * (scale * tl.exp(b))[:, None]).to(dt)
        dstate = dstate * tl.exp(b_last) + tl.dot(tl.trans(q_scaled), do.to(dt), input_precision=PREC)
        dstate -= tl.dot(tl.trans(w), du.to(dt), input_precision=PREC)

    if STORE_DH0:
        store_state(dh0_ptr + nh.to(tl.int64) * K * V, dstate, kcols, vcols, K, V)


@triton.jit
def chunk_grads_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, b_ptr, tinv_ptr, u_ptr, du_ptr, do_ptr,
                       states_ptr, dstates_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr,
                       chunk_start_ptr, chunk_end_ptr, scale, head0,
                       H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr):
    """One chunk and head: dq, dk, dv, dbeta and dg from dO, U, dU and the chunk's states S and dS'
    (U, dU, S, dS' hold the HS heads from head0 on, as state_pass_kernel stores them)."""
    i_c, i_hs = tl.program_id(0), tl.program_id(1)
    i_h = head0 + i_hs
    bos, eos, rows, tok, valid = chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C)
    if eos <= bos:
        return
    dt = k_ptr.dtype.element_ty
    chunk_head = i_c.to(tl.int64) * HS + i_hs
    beta = tl.load(beta_ptr + tok.to(tl.int64) * H + i_h, mask=valid, other=0.0).to(tl.float32)
    if HAS_G:
        b_last = tl.load(b_ptr + (eos - 1).to(tl.int64) * H + i_h)
        # padded rows repeat the last valid b (as in the forward's cumsum): with 0 there, exp(b_pad - b_t) in
        # chunk_decay overflows once a partial chunk decays past exp(-88), and inf * 0 turns the dots into NaN
        b = tl.load(b_ptr + tok.to(tl.int64) * H + i_h, mask=valid, other=0.0)
        b = tl.where(valid, b, b_last)
    else:
        b = tl.zeros((C,), dtype=tl.float32)
        b_last = tl.sum(b, 0)  # 0.0 as a float32 scalar
    tinv = load_tile(tinv_ptr + i_h * C, tok, valid, H * C, rows, C)  # (C, C)
    tinv_t = tl.trans(tinv).to(dt)
    decay = chunk_decay(b, rows)

    # Pass over V: dM = dO U^T, Y = T^T dU (-> dv, dbeta), dA = -Y U^T.
    dm = tl.zeros((C, C), dtype=tl.float32)
    ya = tl.zeros((C, C), dtype=tl.float32)
    dbeta = tl.zeros((C,), dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        vcols = i_v * BV + tl.arange(0, BV)
        do = load_tile(do_ptr + i_h * V, tok, valid, H * V, vcols, V).to(dt)
        u = load_tile(u_ptr + i_hs * V, tok, valid, HS * V, vcols, V).to(dt)
        du = load_tile(du_ptr + i_hs * V, tok, valid, HS * V, vcols, V).to(dt)
        v = load_tile(v_ptr + i_h * V, tok, valid, H * V, vcols, V)
        dm += tl.dot(do, tl.trans(u), input_precision=PREC)
        y = tl.dot(tinv_t, du, input_precision=PREC)  # (C, BV)
        store_tile(dv_ptr + i_h * V, y * beta[:, None], tok, valid, H * V, vcols, V)
        dbeta += tl.sum(v * y, 1)
        ya += tl.dot(y.to(dt), tl.trans(u), input_precision=PREC)
    strict = rows[:, None] > rows[None, :]
    p = tl.where(strict, -ya, 0.0) * decay  # dA * G
    dm_scaled = dm * decay * scale  # dM * G * scale (zero above the diagonal)
    p_dt = p.to(dt)
    dm_dt = dm_scaled.to(dt)

    # Pass over K tiles (each with an inner pass over V for the state terms).
    db = tl.zeros((C,), dtype=tl.float32)
    db_last = tl.sum(db, 0)  # float32 scalar zeros
    state_dot = tl.sum(db, 0)
    exp_b = tl.exp(b)
    to_end = tl.exp(b_last - b)
    for i_k in range(0, tl.cdiv(K, BK)):
        kcols = i_k * BK + tl.arange(0, BK)
        dqs = tl.zeros((C, BK), dtype=tl.float32)  # dO S^T
        dkd = tl.zeros((C, BK), dtype=tl.float32)  # U dS'^T
        dw = tl.zeros((C, BK), dtype=tl.float32)  # -dU S^T
        for i_v in range(0, tl.cdiv(V, BV)):
            vcols = i_v * BV + tl.arange(0, BV)
            s = load_state(states_ptr + chunk_head * K * V, kcols, vcols, K, V)  # (BK, BV)
            ds = load_state(dstates_ptr + chunk_head * K * V, kcols, vcols, K, V)
            do = load_tile(do_ptr + i_h * V, tok, valid, H * V, vcols, V).to(dt)
            u = load_tile(u_ptr + i_hs * V, tok, valid, HS * V, vcols, V).to(dt)
            du = load_tile(du_ptr + i_hs * V, tok, valid, HS * V, vcols, V).to(dt)
            dqs += tl.dot(do, tl.trans(s.to(dt)), input_precision=PREC)
            dkd += tl.dot(u, tl.trans(ds.to(dt)), input_precision=PREC)
            dw -= tl.dot(du, tl.trans(s.to(dt)), input_precision=PREC)
            state_dot += tl.sum(tl.sum(s * ds, 1), 0)
        q = load_tile(q_ptr + i_h * K, tok, valid, H * K, kcols, K)
        k = load_tile(k_ptr + i_h * K, tok, valid, H * K, kcols, K)
        q_dt = q.to(dt)
        k_dt = k.to(dt)
        dq = dqs * (scale * exp_b)[:, None] + tl.dot(dm_dt, k_dt, input_precision=PREC)
        store_tile(dq_ptr + i_h * K, dq, tok, valid, H * K, kcols, K)
        dk_attn = tl.dot(tl.trans(dm_dt), q_dt, input_precision=PREC)  # from M
        z = tl.dot(tinv_t, dw.to(dt), input_precision=PREC)  # grad of diag(beta exp(b)) K, from W
        pk = tl.dot(p_dt, k_dt, input_precision=PREC)  # from A, row side
        ptk = tl.dot(tl.trans(p_dt), (k * beta[:, None]).to(dt), input_precision=PREC)  # from A, column side
        kd_grad = dkd * to_end[:, None]
        dk = dk_attn + kd_grad + z * (beta * exp_b)[:, None] + pk * beta[:, None] + ptk
        store_tile(dk_ptr + i_h * K, dk, tok, valid, H * K, kcols, K)
        kz = tl.sum(k * z, 1)
        kpk = tl.sum(k * pk, 1)
        dbeta += kz * exp_b + kpk
        kd_dot = tl.sum(k * kd_grad, 1)
        db += tl.sum(q * dq, 1) - tl.sum(k * dk_attn, 1) - kd_dot + kz * beta * exp_b + kpk * beta
        db -= tl.sum(k * ptk, 1)
        db_last += tl.sum(kd_dot, 0)
    tl.store(dbeta_ptr + tok.to(tl.int64) * H + i_h, dbeta, mask=valid)
    if HAS_G:
        db_last += state_dot * tl.exp(b_last)
        db = tl.where(valid, db, 0.0)
        dg = tl.sum(db, 0) - tl.cumsum(db, 0) + db + db_last  # reverse cumulative sum, plus d b_C
        tl.store(dg_ptr + tok.to(tl.int64) * H + i_h, dg, mask=valid)
