"""Forward Triton kernels of the chunked gated delta rule (chunk size C = 64).

Per chunk and head, with local cumulative log decay b (b_t = g_1 + ... + g_t inside the chunk), decay
matrix G[t, s] = exp(b_t - b_s) for s <= t (0 above), and incoming state S (K x V):

    A = strict_lower(beta_t G[t, s] k_t.k_s)          T = (I + A)^-1            (UT transform)
    W = T diag(beta exp(b)) K                          U0 = T diag(beta) V
    U = U0 - W S                                       (the chunk's delta updates)
    O = diag(scale exp(b)) Q S + M U,                  M = scale * G * (Q K^T)
    S' = exp(b_C) S + (diag(exp(b_C - b)) K)^T U

Kernels:
  wy_prepare_kernel    grid (chunks, H): b, T, M, W, U0 of one chunk (parallel over chunks); T by a blocked
                       inverse (unit_lower_inverse). W and U0 are left out when the forward goes head by head.
  wy_recompute_kernel  grid (chunks, HS): W and U0 again from the stored T for HS heads (the backward, and a
                       forward head by head).
  state_pass_kernel    grid (N x HS x V tiles,): the sequential pass over one sequence's chunks; stores the per-chunk
                       incoming states and U (forward, and the backward's recompute a group of HS heads at a
                       time) or, for inputs of one chunk per sequence, writes O itself; and the final state.
  chunk_output_kernel  grid (chunks, HS, V tiles): O of one chunk from its stored state and U (parallel), for the
                       HS heads of a pass (all H, or one at a time).

Token-major layouts: q, k, W (tokens, H, K); v, U0, U, o (tokens, H, V); g, beta, b (tokens, H);
T, M (tokens, H, C) in k's dtype; per-chunk states (chunks, H, K, V). Chunk j covers tokens
[chunk_start[j], chunk_end[j]) of one sequence; an empty entry (start == end) is a grid slot left unused.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, tok, valid, stride, cols, ncols):
    """Rows `tok` (tokens, masked by `valid`) x columns `cols` (< ncols) of a token-major array, as float32."""
    offs = tok[:, None].to(tl.int64) * stride + cols[None, :]
    mask = valid[:, None] & (cols[None, :] < ncols)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_tile_transposed(ptr, tok, valid, stride, cols, ncols):
    """Columns `cols` x rows `tok` of a token-major array, i.e. load_tile(...)^T as its own load, float32."""
    offs = cols[:, None] + tok[None, :].to(tl.int64) * stride
    mask = (cols[:, None] < ncols) & valid[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, value, tok, valid, stride, cols, ncols):
    """Store `value` (rows tok x cols) into a token-major array, cast to its element type."""
    offs = tok[:, None].to(tl.int64) * stride + cols[None, :]
    mask = valid[:, None] & (cols[None, :] < ncols)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_state(ptr, rows, cols, K, V):
    """(BK, BV) float32 tile of a (K, V) state starting at ptr."""
    mask = (rows[:, None] < K) & (cols[None, :] < V)
    return tl.load(ptr + rows[:, None] * V + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_state(ptr, value, rows, cols, K, V):
    """Store a (BK, BV) tile into a (K, V) state starting at ptr, cast to its element type."""
    mask = (rows[:, None] < K) & (cols[None, :] < V)
    tl.store(ptr + rows[:, None] * V + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def chunk_decay(b, rows):
    """(C, C) float32 G[t, s] = exp(b_t - b_s) for s <= t, else 0 (masked before exp: no overflow)."""
    causal = rows[:, None] >= rows[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, b[:, None] - b[None, :], 0.0)), 0.0)


@triton.jit
def load_log_decay(g_ptr, tok, valid, H, HAS_G: tl.constexpr):
    """(C,) local cumulative log decay b (0 without g); padded rows repeat the last valid value."""
    if HAS_G:
        g = tl.load(g_ptr + tok.to(tl.int64) * H, mask=valid, other=0.0).to(tl.float32)
        return tl.cumsum(g, 0)
    else:
        return tl.zeros(tok.shape, dtype=tl.float32)


@triton.jit
def chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C: tl.constexpr):
    """Chunk i_c of the packed token axis: its tokens [bos, eos), row numbers (C,), tokens (C,) and which are
    valid. A chunk of the grid's upper bound that holds no tokens has eos <= bos (its program returns)."""
    bos = tl.load(chunk_start_ptr + i_c).to(tl.int32)
    eos = tl.load(chunk_end_ptr + i_c).to(tl.int32)
    rows = tl.arange(0, C)
    return bos, eos, rows, bos + rows, rows < eos - bos


@triton.jit
def load_log_decay_stored(b_ptr, tok, valid, H, HAS_G: tl.constexpr):
    """(C,) b as wy_prepare_kernel stored it (0 without g)."""
    if HAS_G:
        return tl.load(b_ptr + tok.to(tl.int64) * H, mask=valid, other=0.0)
    else:
        return tl.zeros(tok.shape, dtype=tl.float32)


@triton.jit
def unit_lower_inverse(a, C: tl.constexpr, PREC: tl.constexpr):
    """(I + a)^-1 for a strictly lower-triangular (C, C) float32 a, C a multiple of 16, blocked by 16 rows.

    The C/16 diagonal blocks are inverted together by forward substitution (15 steps on a (C/16, 16, 16)
    tile, instead of C - 1 steps on the whole (C, C) tile). With D their block-diagonal inverse,
    D (I + a) = I + N where N = D strict_block_lower(a) is nilpotent (N^4 = 0 for four blocks), so
    (I + a)^-1 = (I - N + N^2 - N^3) D: four (C, C) dots, exact block by block (N's diagonal blocks are 0).
    """
    NB: tl.constexpr = C // 16
    tl.static_assert(C % 16 == 0 and NB <= 4, "the series below is exact for at most four 16-row blocks")
    blocks = tl.arange(0, NB)
    r16 = tl.arange(0, 16)
    same_block = blocks[:, None, None, None] == blocks[None, None, :, None]  # (NB, 1, NB, 1)
    diag = tl.sum(tl.where(same_block, tl.reshape(a, (NB, 16, NB, 16)), 0.0), 2)  # (NB, 16, 16)
    t = -diag  # row i of each block's strict part: t_i = -a_i - sum_{j<i} a_ij t_j, rows in order
    row_index = r16[None, :, None]
    for i in range(1, 16):
        is_row = row_index == i
        row = tl.sum(tl.where(is_row, t, 0.0), 1)  # (NB, 16) = -a_i, zero from column i on
        row = row + tl.sum(row[:, :, None] * t, 1)
        t = tl.where(is_row, row[:, None, :], t)
    t = t + tl.where(row_index == r16[None, None, :], 1.0, 0.0)
    d = tl.reshape(tl.where(same_block, t[:, :, None, :], 0.0), (C, C))  # block-diagonal (C, C)
    rows = tl.arange(0, C)
    block_below = (rows[:, None] // 16) > (rows[None, :] // 16)
    n = tl.dot(d, tl.where(block_below, a, 0.0), input_precision=PREC)
    t_full = d - tl.dot(n, d, input_precision=PREC)  # Horner: D - N (D - N (D - N D))
    t_full = d - tl.dot(n, t_full, input_precision=PREC)
    return d - tl.dot(n, t_full, input_precision=PREC)


@triton.jit
def wy_prepare_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, b_ptr, tinv_ptr, m_ptr, w_ptr, u0_ptr,
                      chunk_start_ptr, chunk_end_ptr, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, STORE_WY: tl.constexpr,
                      PREC: tl.constexpr):
    """One chunk and head: b, T = (I + A)^-1, M, and (STORE_WY) W = T diag(beta exp(b)) K, U0 = T diag(beta) V."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos, rows, tok, valid = chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C)
    if eos <= bos:
        return
    dt = k_ptr.dtype.element_ty
    beta = tl.load(beta_ptr + tok.to(tl.int64) * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b = load_log_decay(g_ptr + i_h, tok, valid, H, HAS_G)
    if HAS_G:
        tl.store(b_ptr + tok.to(tl.int64) * H + i_h, b, mask=valid)

    kk = tl.zeros((C, C), dtype=tl.float32)
    qk = tl.zeros((C, C), dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        k = load_tile(k_ptr + i_h * K, tok, valid, H * K, cols, K).to(dt)
        # K^T as its own load, and the launcher turns software pipelining off for this kernel: on Triton 3.6 /
        # H100, dot(k, trans(k)) here with 3-stage pipelining gave wrong bf16 results at K = 256 (T 3e-2 off,
        # exact at K <= 128 and in float32). Both changes went in together; which one matters is not isolated.
        k_t = load_tile_transposed(k_ptr + i_h * K, tok, valid, H * K, cols, K).to(dt)
        q = load_tile(q_ptr + i_h * K, tok, valid, H * K, cols, K).to(dt)
        kk += tl.dot(k, k_t, input_precision=PREC)
        qk += tl.dot(q, k_t, input_precision=PREC)
    decay = chunk_decay(b, rows)  # (C, C)
    strict = rows[:, None] > rows[None, :]
    a = tl.where(strict, beta[:, None] * decay * kk, 0.0)
    store_tile(m_ptr + i_h * C, qk * decay * scale, tok, valid, H * C, rows, C)
    tinv = unit_lower_inverse(a, C, PREC)
    store_tile(tinv_ptr + i_h * C, tinv, tok, valid, H * C, rows, C)

    if STORE_WY:
        apply_wy(tinv, beta, b, k_ptr + i_h * K, v_ptr + i_h * V, w_ptr + i_h * K, u0_ptr + i_h * V, tok, valid,
                 H * K, H * V, H * K, H * V, K, V, BK, BV, PREC)


@triton.jit
def apply_wy(tinv, beta, b, k_ptr, v_ptr, w_ptr, u0_ptr, tok, valid, k_stride, v_stride, w_stride, u0_stride,
             K, V, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Store W = T diag(beta exp(b)) K and U0 = T diag(beta) V of one chunk and head (T float32 (C, C))."""
    dt = k_ptr.dtype.element_ty
    # The row weights of K and V act as column weights of T: T diag(x) K = (T diag(x)) K, so the (C, BK) and
    # (C, BV) tiles go to the dot in their own dtype (no float32 copies) and the weights touch one (C, C) tile.
    t_k = (tinv * (beta * tl.exp(b))[None, :]).to(dt)
    t_v = (tinv * beta[None, :]).to(dt)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        k = load_tile(k_ptr, tok, valid, k_stride, cols, K).to(dt)
        store_tile(w_ptr, tl.dot(t_k, k, input_precision=PREC), tok, valid, w_stride, cols, K)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols = i_v * BV + tl.arange(0, BV)
        v = load_tile(v_ptr, tok, valid, v_stride, cols, V).to(dt)
        store_tile(u0_ptr, tl.dot(t_v, v, input_precision=PREC), tok, valid, u0_stride, cols, V)


@triton.jit
def wy_recompute_kernel(k_ptr, v_ptr, beta_ptr, b_ptr, tinv_ptr, w_ptr, u0_ptr, chunk_start_ptr, chunk_end_ptr,
                        head0, H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                        PREC: tl.constexpr):
    """One chunk and head head0 + i_hs: W and U0 again from the stored T, for the backward (which keeps them for
    HS heads at a time instead of saving them for all heads)."""
    i_c, i_hs = tl.program_id(0), tl.program_id(1)
    i_h = head0 + i_hs
    bos, eos, rows, tok, valid = chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C)
    if eos <= bos:
        return
    beta = tl.load(beta_ptr + tok.to(tl.int64) * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b = load_log_decay_stored(b_ptr + i_h, tok, valid, H, HAS_G)
    tinv = load_tile(tinv_ptr + i_h * C, tok, valid, H * C, rows, C)
    apply_wy(tinv, beta, b, k_ptr + i_h * K, v_ptr + i_h * V, w_ptr + i_hs * K, u0_ptr + i_hs * V, tok, valid,
             H * K, H * V, HS * K, HS * V, K, V, BK, BV, PREC)


@triton.jit
def load_state_or_zeros(ptr, nh, kcols, vcols, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, LOAD: tl.constexpr):
    """The (BK, BV) float32 tile of row nh's (K, V) state at ptr when LOAD, else zeros."""
    if LOAD:
        return load_state(ptr + nh.to(tl.int64) * K * V, kcols, vcols, K, V)
    else:
        return tl.zeros((BK, BV), dtype=tl.float32)


@triton.jit
def sequence_program(seq_order_ptr, cu_seqlens_ptr, chunk_offsets_ptr, start_ptr, head0, H: tl.constexpr,
                     HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, WY_LOCAL: tl.constexpr, HAS_START: tl.constexpr):
    """A sequential kernel's program on its 1-D grid of N x HS x V tiles: (sequence i_n, head of the pass i_hs,
    head i_h = head0 + i_hs, W/U0 head i_wy (i_hs when WY_LOCAL), row nh = i_n * H + i_h, tokens [bos, eos), the
    sequence's first chunk, a chunk's row numbers (C,), the state tile's rows kcols and columns vcols, and the
    carried (BK, BV) float32 tile it starts from: row nh of the (N, H, K, V) start_ptr when HAS_START, else zeros).

    The grid walks the sequences longest first (seq_order), all heads and V tiles of one sequence together: the
    GPU starts programs in grid order, so the longest chains start first (no long chain left for the last wave)
    and a sequence's V tiles, which load the same K and W, run side by side."""
    VT: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_v = pid % VT
    i_hs = (pid // VT) % HS
    i_n = tl.load(seq_order_ptr + pid // (VT * HS))
    i_h = head0 + i_hs
    i_wy = i_hs if WY_LOCAL else i_h
    bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int32)
    first_chunk = tl.load(chunk_offsets_ptr + i_n).to(tl.int64)
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    nh = i_n * H + i_h
    start = load_state_or_zeros(start_ptr, nh, kcols, vcols, K, V, BK, BV, HAS_START)
    return i_n, i_hs, i_h, i_wy, nh, bos, eos, first_chunk, tl.arange(0, C), kcols, vcols, start


@triton.jit
def sequence_chunk(b_ptr, bos, eos, j, H, C: tl.constexpr, HAS_G: tl.constexpr):
    """Chunk j of a sequence [bos, eos): its tokens (C,), which are valid, its cumulative log decay b (C,) as
    wy_prepare_kernel stored it (b_ptr offset to the head) and b at its last valid token (0 without g)."""
    tok = bos + j * C + tl.arange(0, C)
    valid = tok < eos
    b = load_log_decay_stored(b_ptr, tok, valid, H, HAS_G)
    if HAS_G:
        last = tl.minimum(bos + j * C + C, eos) - 1
        b_last = tl.load(b_ptr + last.to(tl.int64) * H)
    else:
        b_last = tl.sum(b, 0)  # 0.0 as a float32 scalar
    return tok, valid, b, b_last


@triton.jit
def state_pass_kernel(q_ptr, k_ptr, w_ptr, u0_ptr, b_ptr, m_ptr, h0_ptr, o_ptr, states_ptr, u_ptr, ht_ptr,
                      cu_seqlens_ptr, chunk_offsets_ptr, seq_order_ptr, scale, head0,
                      H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_H0: tl.constexpr,
                      STORE_FINAL: tl.constexpr, OUTPUT: tl.constexpr, STORE_STATES: tl.constexpr,
                      WY_LOCAL: tl.constexpr, PREC: tl.constexpr):
    """One sequence, head and V tile: walk the chunks in order carrying the state S (BK >= K, BV).

    Heads head0 .. head0 + HS - 1 (the program's head i_hs is head head0 + i_hs): the stored states and U
    hold these HS heads only, so a backward pass over a few heads at a time needs scratch for those only;
    so do W and U0 when WY_LOCAL (recomputed for those heads by wy_recompute_kernel)."""
    i_n, i_hs, i_h, i_wy, nh, bos, eos, first_chunk, rows, kcols, vcols, state = sequence_program(
        seq_order_ptr, cu_seqlens_ptr, chunk_offsets_ptr, h0_ptr, head0, H, HS, K, V, C, BK, BV, WY_LOCAL, HAS_H0)
    WYH = HS if WY_LOCAL else H
    dt = k_ptr.dtype.element_ty

    for j in range(0, tl.cdiv(eos - bos, C)):
        tok, valid, b, b_last = sequence_chunk(b_ptr + i_h, bos, eos, j, H, C, HAS_G)
        if STORE_STATES:
            chunk_head = (first_chunk + j) * HS + i_hs
            store_state(states_ptr + chunk_head * K * V, state, kcols, vcols, K, V)
        w = load_tile(w_ptr + i_wy * K, tok, valid, WYH * K, kcols, K).to(dt)  # (C, BK)
        u0 = load_tile(u0_ptr + i_wy * V, tok, valid, WYH * V, vcols, V)  # (C, BV)
        u = u0 - tl.dot(w, state.to(dt), input_precision=PREC)  # (C, BV)
        if STORE_STATES:
            store_tile(u_ptr + i_hs * V, u, tok, valid, HS * V, vcols, V)
        if OUTPUT:
            q = load_tile(q_ptr + i_h * K, tok, valid, H * K, kcols, K).to(dt)
            m = load_tile(m_ptr + i_h * C, tok, valid, H * C, rows, C)
            o = tl.dot(q, state.to(dt), input_precision=PREC) * (scale * tl.exp(b))[:, None]
            o += tl.dot(m.to(dt), u.to(dt), input_precision=PREC)
            store_tile(o_ptr + i_h * V, o, tok, valid, H * V, vcols, V)
        # the decay to the chunk's end weighs U's rows rather than K's: K stays in its dtype, (C, BV) float32 work
        k = load_tile(k_ptr + i_h * K, tok, valid, H * K, kcols, K).to(dt)  # (C, BK)
        u_to_end = (u * tl.exp(b_last - b)[:, None]).to(dt)
        state = state * tl.exp(b_last) + tl.dot(tl.trans(k), u_to_end, input_precision=PREC)

    if STORE_FINAL:
        store_state(ht_ptr + nh.to(tl.int64) * K * V, state, kcols, vcols, K, V)


@triton.jit
def chunk_output_kernel(q_ptr, b_ptr, m_ptr, states_ptr, u_ptr, o_ptr, chunk_start_ptr, chunk_end_ptr, scale,
                        head0, H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr):
    """One chunk, head head0 + i_hs and V tile: O = diag(scale exp(b)) Q S + M U from the chunk's stored state S and
    U, which hold the HS heads of the pass."""
    i_c, i_hs, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = head0 + i_hs
    bos, eos, rows, tok, valid = chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C)
    if eos <= bos:
        return
    dt = q_ptr.dtype.element_ty
    vcols = i_v * BV + tl.arange(0, BV)
    chunk_head = i_c.to(tl.int64) * HS + i_hs
    b = load_log_decay_stored(b_ptr + i_h, tok, valid, H, HAS_G)
    m = load_tile(m_ptr + i_h * C, tok, valid, H * C, rows, C).to(dt)  # (C, C)
    u = load_tile(u_ptr + i_hs * V, tok, valid, HS * V, vcols, V).to(dt)  # (C, BV)
    qs = tl.zeros((C, BV), dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        kcols = i_k * BK + tl.arange(0, BK)
        q = load_tile(q_ptr + i_h * K, tok, valid, H * K, kcols, K).to(dt)  # (C, BK)
        s = load_state(states_ptr + chunk_head * K * V, kcols, vcols, K, V).to(dt)  # (BK, BV)
        qs += tl.dot(q, s, input_precision=PREC)
    o = qs * (scale * tl.exp(b))[:, None] + tl.dot(m, u, input_precision=PREC)
    store_tile(o_ptr + i_h * V, o, tok, valid, H * V, vcols, V)
