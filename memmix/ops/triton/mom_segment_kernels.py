"""Triton kernels of the MoM mixer's Triton path (memmix.ops.mom.triton_path): gathered segment convolution and
weighted combine, and their autograd.

Launch layout: row kernels take (row tile, head) programs over the L buffer rows; the token kernel takes
(token tile, head) programs for a source that a token's slots share (q), summing its rows' gradients without
atomics; per-memory sources get theirs scattered row by row (each (token, memory) row written once, the
unpicked ones zero-filled). One launch per feature group (q, k, v, gates); no host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from memmix.ops.normalize import L2NORM_EPS
from memmix.ops.triton import runtime



# --------------------------------------------------------------------------- kernels

@triton.jit
def _program_tile(n, width, B: tl.constexpr, BC: tl.constexpr):
    """A program of a (row or token tiles, heads) grid: its tile number, head, B indices and which are < n, and
    the head's BC channel columns, which are < width, with their channels head * width + cols."""
    pid, head = tl.program_id(0), tl.program_id(1)
    idx = pid * B + tl.arange(0, B)
    cols = tl.arange(0, BC)
    return pid, head, idx, idx < n, cols, cols < width, head * width + cols


@triton.jit
def _tail_tap(tails_ptr, tails_seg_stride, tails_row_stride, pos, seg, rvalid, ch, cvalid, j, num_segments,
              W: tl.constexpr):
    """(BR, BC) float32 tail part of tap j: the segment's tail input for rows with pos < j, zero otherwise."""
    before = rvalid & (pos < j) & (seg < num_segments)
    tail_row = W - 1 - (j - pos)
    toffs = seg.to(tl.int64)[:, None] * tails_seg_stride + tail_row[:, None] * tails_row_stride + ch[None, :]
    return tl.load(tails_ptr + toffs, mask=before[:, None] & cvalid[None, :], other=0.0).to(tl.float32)


@triton.jit
def _gather_tap(src_ptr, tok_stride, mem_stride, tails_ptr, tails_seg_stride, tails_row_stride,
                row_tok_ptr, row_mem_ptr, rows, pos, seg, rvalid, ch, cvalid, j, num_segments,
                W: tl.constexpr, HAS_TAILS: tl.constexpr):
    """(BR, BC) float32 input of tap j (row r - j) for rows `rows`: the gathered row inside the segment,
    the segment's tail before its start, zero otherwise."""
    inside = rvalid & (pos >= j)
    src_row = rows - j
    tok = tl.load(row_tok_ptr + src_row, mask=inside, other=0).to(tl.int64)
    mem = tl.load(row_mem_ptr + src_row, mask=inside, other=0).to(tl.int64)
    offs = tok[:, None] * tok_stride + mem[:, None] * mem_stride + ch[None, :]
    x = tl.load(src_ptr + offs, mask=inside[:, None] & cvalid[None, :], other=0.0).to(tl.float32)
    if HAS_TAILS:
        x += _tail_tap(tails_ptr, tails_seg_stride, tails_row_stride, pos, seg, rvalid, ch, cvalid, j, num_segments, W)
    return x


@triton.jit
def segment_conv_fwd_kernel(src_ptr, tok_stride, mem_stride, w_ptr, tails_ptr, tails_seg_stride,
                            tails_row_stride, out_ptr, row_tok_ptr, row_mem_ptr, row_seg_ptr, row_pos_ptr,
                            L, num_segments, width, eps,
                            W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, CONV: tl.constexpr,
                            NORM: tl.constexpr, HAS_TAILS: tl.constexpr):
    """Rows tile x one head (width channels): out = l2norm?(silu(conv(gathered rows))) or the gathered rows."""
    pid_r, head, rows, rvalid, cols, cvalid, ch = _program_tile(L, width, BR, BC)
    pos = tl.load(row_pos_ptr + rows, mask=rvalid, other=0)
    seg = tl.load(row_seg_ptr + rows, mask=rvalid, other=0)
    if CONV:
        acc = tl.zeros((BR, BC), dtype=tl.float32)
        for j in tl.static_range(W):
            x = _gather_tap(src_ptr, tok_stride, mem_stride, tails_ptr, tails_seg_stride, tails_row_stride,
                            row_tok_ptr, row_mem_ptr, rows, pos, seg, rvalid, ch, cvalid, j, num_segments,
                            W, HAS_TAILS)
            wj = tl.load(w_ptr + ch * W + (W - 1 - j), mask=cvalid, other=0.0).to(tl.float32)
            acc += x * wj[None, :]
        y = acc * tl.sigmoid(acc)
    else:
        y = _gather_tap(src_ptr, tok_stride, mem_stride, tails_ptr, 0, 0, row_tok_ptr, row_mem_ptr, rows,
                        pos, seg, rvalid, ch, cvalid, 0, num_segments, W, False)
    if NORM:
        y = y * tl.rsqrt(tl.sum(y * y, 1) + eps)[:, None]
    out_offs = rows.to(tl.int64)[:, None] * (tl.num_programs(1) * width) + ch[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=rvalid[:, None] & cvalid[None, :])


@triton.jit
def segment_conv_bwd_rows_kernel(src_ptr, tok_stride, mem_stride, w_ptr, tails_ptr, tails_seg_stride,
                                 tails_row_stride, dout_ptr, dacc_ptr, dw_part_ptr, dw_tile_stride,
                                 row_tok_ptr, row_mem_ptr, row_seg_ptr, row_pos_ptr, L, num_segments, width, eps,
                                 W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NORM: tl.constexpr,
                                 HAS_TAILS: tl.constexpr):
    """Back through norm and SiLU to the convolution's pre-activation: dacc (rows, channels), and (with tails)
    this row tile's share of the weight gradient from the tail inputs, dw_part[tile, channel, tap]; the
    gathered rows' share is taken by segment_conv_bwd_scatter_kernel / segment_conv_bwd_tokens_kernel."""
    pid_r, head, rows, rvalid, cols, cvalid, ch = _program_tile(L, width, BR, BC)
    pos = tl.load(row_pos_ptr + rows, mask=rvalid, other=0)
    seg = tl.load(row_seg_ptr + rows, mask=rvalid, other=0)
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for j in tl.static_range(W):
        x = _gather_tap(src_ptr, tok_stride, mem_stride, tails_ptr, tails_seg_stride, tails_row_stride,
                        row_tok_ptr, row_mem_ptr, rows, pos, seg, rvalid, ch, cvalid, j, num_segments, W, HAS_TAILS)
        wj = tl.load(w_ptr + ch * W + (W - 1 - j), mask=cvalid, other=0.0).to(tl.float32)
        acc += x * wj[None, :]
    sig = tl.sigmoid(acc)
    y = acc * sig
    offs = rows.to(tl.int64)[:, None] * (tl.num_programs(1) * width) + ch[None, :]
    mask = rvalid[:, None] & cvalid[None, :]
    dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        r = tl.rsqrt(tl.sum(y * y, 1) + eps)
        n = y * r[:, None]
        dy = r[:, None] * (dy - n * tl.sum(dy * n, 1)[:, None])
    dacc = dy * sig * (1.0 + acc * (1.0 - sig))
    tl.store(dacc_ptr + offs, dacc.to(dacc_ptr.dtype.element_ty), mask=mask)
    if HAS_TAILS:
        for j in tl.static_range(1, W):
            x = _tail_tap(tails_ptr, tails_seg_stride, tails_row_stride, pos, seg, rvalid, ch, cvalid, j,
                          num_segments, W)
            tl.store(dw_part_ptr + pid_r.to(tl.int64) * dw_tile_stride + ch * W + (W - 1 - j),
                     tl.sum(x * dacc, 0), mask=cvalid)


@triton.jit
def segment_conv_bwd_tokens_kernel(dacc_ptr, w_ptr, src_ptr, src_tok_stride, dsrc_ptr, dsrc_tok_stride, dw_part_ptr,
                                   dw_tile_stride, slot_row_ptr, row_seg_ptr, num_tokens, L, width,
                                   S: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr,
                                   BC: tl.constexpr, CONV: tl.constexpr):
    """Gradient of a source shared by a token's slots (q, or every memory's k / v / gates under one projection),
    token-major: dx[t] = sum over t's S rows r of sum_j w[W-1-j] dacc[r + j] (row r's input feeds rows
    r .. r + W - 1 of its segment), and (CONV) the weight gradient's share of this token tile,
    dw_part[tile, channel, W-1-j] = sum_r x[r] dacc[r + j]."""
    pid_t, head, toks, tvalid, cols, cvalid, ch = _program_tile(num_tokens, width, BT, BC)
    dacc_stride = tl.num_programs(1) * width
    dw = tl.zeros((WP, BC), dtype=tl.float32)  # [tap, channel]
    x = tl.load(src_ptr + toks.to(tl.int64)[:, None] * src_tok_stride + ch[None, :],
                mask=tvalid[:, None] & cvalid[None, :], other=0.0).to(tl.float32)
    total = tl.zeros((BT, BC), dtype=tl.float32)
    for s in range(S):
        row = tl.load(slot_row_ptr + toks.to(tl.int64) * S + s, mask=tvalid, other=0)
        dx, dw = _row_input_grad(dacc_ptr, dacc_stride, w_ptr, row_seg_ptr, row, tvalid, ch, cvalid, L, x, dw,
                                 W, WP, BT, BC, CONV)
        total += dx
    offs = toks.to(tl.int64)[:, None] * dsrc_tok_stride + ch[None, :]
    tl.store(dsrc_ptr + offs, total.to(dsrc_ptr.dtype.element_ty), mask=tvalid[:, None] & cvalid[None, :])
    if CONV:
        taps = tl.arange(0, WP)
        tl.store(dw_part_ptr + pid_t.to(tl.int64) * dw_tile_stride + ch[None, :] * W + taps[:, None], dw,
                 mask=(taps[:, None] < W) & cvalid[None, :])


@triton.jit
def segment_conv_bwd_scatter_kernel(dacc_ptr, w_ptr, src_ptr, tok_stride, mem_stride, dsrc_ptr, dtok_stride,
                                    dmem_stride, dw_part_ptr, dw_tile_stride, row_tok_ptr, row_mem_ptr, row_seg_ptr,
                                    L, width, W: tl.constexpr, WP: tl.constexpr, BR: tl.constexpr,
                                    BC: tl.constexpr, CONV: tl.constexpr):
    """Gradient of a per-memory source, row-major: row r's input x[r] = src[row_token[r], row_memory[r]] feeds
    rows r .. r + W - 1 of its segment, so dx[r] = sum_j w[W-1-j] dacc[r + j] (contiguous rows) is stored at
    that (token, memory) -- each exactly once, rows and picked (token, memory) pairs being a bijection; the
    caller zero-fills the rest. CONV: dw_part[tile, channel, W-1-j] = sum_r x[r] dacc[r + j] of this row tile."""
    pid_r, head, rows, rvalid, cols, cvalid, ch = _program_tile(L, width, BR, BC)
    mask = rvalid[:, None] & cvalid[None, :]
    dacc_stride = tl.num_programs(1) * width
    tok = tl.load(row_tok_ptr + rows, mask=rvalid, other=0).to(tl.int64)
    mem = tl.load(row_mem_ptr + rows, mask=rvalid, other=0).to(tl.int64)
    x = tl.zeros((BR, BC), dtype=tl.float32)
    if CONV:
        x = tl.load(src_ptr + tok[:, None] * tok_stride + mem[:, None] * mem_stride + ch[None, :], mask=mask,
                    other=0.0).to(tl.float32)
    dx, dw = _row_input_grad(dacc_ptr, dacc_stride, w_ptr, row_seg_ptr, rows, rvalid, ch, cvalid, L, x,
                             tl.zeros((WP, BC), dtype=tl.float32), W, WP, BR, BC, CONV)
    if CONV:
        taps = tl.arange(0, WP)
        tl.store(dw_part_ptr + pid_r.to(tl.int64) * dw_tile_stride + ch[None, :] * W + taps[:, None], dw,
                 mask=(taps[:, None] < W) & cvalid[None, :])
    tl.store(dsrc_ptr + tok[:, None] * dtok_stride + mem[:, None] * dmem_stride + ch[None, :],
             dx.to(dsrc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_input_grad(dacc_ptr, dacc_stride, w_ptr, row_seg_ptr, row, valid, ch, cvalid, L, x, dw,
                    W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, CONV: tl.constexpr):
    """(BT, BC) float32 gradient of the input x held by rows `row` (zero where not valid), and dw (WP, BC)
    plus the weight gradient's terms of these rows."""
    seg = tl.load(row_seg_ptr + row, mask=valid, other=-1)
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    if CONV:
        taps = tl.arange(0, WP)
        for j in tl.static_range(W):
            target = row + j
            same = valid & (target < L)
            same = same & (tl.load(row_seg_ptr + target, mask=same, other=-2) == seg)
            d = tl.load(dacc_ptr + target.to(tl.int64)[:, None] * dacc_stride + ch[None, :],
                        mask=same[:, None] & cvalid[None, :], other=0.0).to(tl.float32)
            wj = tl.load(w_ptr + ch * W + (W - 1 - j), mask=cvalid, other=0.0).to(tl.float32)
            dx += d * wj[None, :]
            dw += tl.where(taps[:, None] == W - 1 - j, tl.sum(x * d, 0)[None, :], 0.0)
    else:
        dx += tl.load(dacc_ptr + row.to(tl.int64)[:, None] * dacc_stride + ch[None, :],
                      mask=valid[:, None] & cvalid[None, :], other=0.0).to(tl.float32)
    return dx, dw


@triton.jit
def segment_combine_fwd_kernel(rows_ptr, slot_row_ptr, weight_ptr, out_ptr, num_tokens, C,
                               S: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """out[t, c] = sum_s weight[t, s] * rows[slot_row[t, s], c]."""
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    tvalid = toks < num_tokens
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = tvalid[:, None] & (cols < C)[None, :]
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for s in range(S):
        row = tl.load(slot_row_ptr + toks.to(tl.int64) * S + s, mask=tvalid, other=0).to(tl.int64)
        w = tl.load(weight_ptr + toks.to(tl.int64) * S + s, mask=tvalid, other=0.0).to(tl.float32)
        x = tl.load(rows_ptr + row[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += w[:, None] * x
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def segment_combine_bwd_kernel(rows_ptr, slot_row_ptr, weight_ptr, dout_ptr, drows_ptr, dweight_part_ptr,
                               num_tokens, C, S: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """drows[slot_row[t, s]] = weight[t, s] * dout[t]; this column tile's share of dweight[t, s]."""
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    tvalid = toks < num_tokens
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = tvalid[:, None] & (cols < C)[None, :]
    dout = tl.load(dout_ptr + toks.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    for s in range(S):
        row = tl.load(slot_row_ptr + toks.to(tl.int64) * S + s, mask=tvalid, other=0).to(tl.int64)
        w = tl.load(weight_ptr + toks.to(tl.int64) * S + s, mask=tvalid, other=0.0).to(tl.float32)
        x = tl.load(rows_ptr + row[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(drows_ptr + row[:, None] * C + cols[None, :], (w[:, None] * dout).to(drows_ptr.dtype.element_ty),
                 mask=mask)
        part = tl.sum(x * dout, 1)  # (BT,)
        tl.store(dweight_part_ptr + (tl.program_id(1).to(tl.int64) * num_tokens + toks) * S + s, part, mask=tvalid)


# --------------------------------------------------------------------------- launch helpers

def _warps(width: int) -> dict:
    """The launch config of a kernel over `width` channels of a head."""
    return {"num_warps": 8 if width > 128 else 4}


FOUR_WARPS = {"num_warps": 4}


ROWS_PER_PROGRAM = 32
# rows of segment_conv_bwd_scatter_kernel: 64 measured faster than 32 for the MoM layer's forward + backward (fewer
# tiles: each leaves one weight-gradient share to sum)
SCATTER_ROWS_PER_PROGRAM = 64
TOKENS_PER_PROGRAM = 16


def _groups(fg):
    """(name, channel offset in the per-memory source or None for q, width per head, heads, conv, norm,
    channel offset in the conv weight/tails)."""
    H, K, V = fg.num_heads, fg.head_k, fg.head_v
    return [("q", None, K, H, True, True, 0), ("k", 0, K, H, True, True, H * K),
            ("v", H * K, V, H, True, False, 2 * H * K), ("gates", H * (K + V), fg.num_gates, 1, False, False, None)]


class SegmentConvFunction(torch.autograd.Function):
    """q_src (T_tok, H*K); kv_src (T_tok, P, H*K + H*V + G); weight (2HK + HV, W) -> q, k (L, H*K), v (L, H*V),
    gates (L, G). tails (num_segments, W - 1, 2HK + HV) or None (no gradient flows to tails).

    kv_x (T_tok, D), kv_w (P * F, D) or None: kv_src's projection inputs (kv_src = kv_x kv_w^T). Given, they are
    saved instead of kv_src and receive the gradient themselves (kv_src gets none); the backward rebuilds one
    feature group (k, v, gates) of kv_src at a time, so neither kv_src nor its gradient is ever whole."""

    @staticmethod
    def forward(ctx, q_src, kv_src, weight, tables, fg, tails, kv_x, kv_w):
        L, W = tables.num_rows, fg.conv_size
        outs = []
        for name, offset, width, heads, conv, norm, woff in _groups(fg):
            src, tok_stride, mem_stride = _source(q_src, kv_src, offset)
            out = q_src.new_empty(L, heads * width)
            t_ptr, t_seg, t_row = _tails_args(tails, woff, out)
            if L > 0 and width > 0:
                runtime.launch(segment_conv_fwd_kernel, (triton.cdiv(L, ROWS_PER_PROGRAM), heads),
                               (src, tok_stride, mem_stride, weight[woff:] if conv else weight, t_ptr, t_seg, t_row,
                                out, tables.row_token, tables.row_memory, tables.row_segment, tables.row_position,
                                L, tables.num_segments, width, L2NORM_EPS),
                               dict(W=W, BR=ROWS_PER_PROGRAM, BC=runtime.tile(width), CONV=conv, NORM=norm,
                                    HAS_TAILS=tails is not None), _warps(width))
            outs.append(out)
        ctx.rebuild = kv_x is not None
        ctx.kv_shape = kv_src.shape
        ctx.save_for_backward(q_src, weight, tails, *((kv_x, kv_w) if ctx.rebuild else (kv_src,)))
        ctx.tables, ctx.fg = tables, fg
        return tuple(outs)

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, dq, dk, dv, dgates):
        q_src, weight, tails, *kv_saved = ctx.saved_tensors
        tables, fg = ctx.tables, ctx.fg
        L, W = tables.num_rows, fg.conv_size
        num_tokens, S = tables.slot_row.shape
        P, F = ctx.kv_shape[1], ctx.kv_shape[2]
        per_memory = P > 1  # k, v, gates: one source row per (token, memory), row-major scatter
        if ctx.rebuild:
            kv_x, kv_w = kv_saved
            kv = _RebuiltProjection(kv_x, kv_w, P, F)
        else:
            kv_src, = kv_saved
            d_kv_src = torch.zeros_like(kv_src) if per_memory else torch.empty_like(kv_src)  # unpicked rows stay 0
        d_q_src = torch.empty_like(q_src)
        row_tiles = triton.cdiv(L, ROWS_PER_PROGRAM)
        scatter_tiles = triton.cdiv(L, SCATTER_ROWS_PER_PROGRAM)
        token_tiles = triton.cdiv(num_tokens, TOKENS_PER_PROGRAM)
        # weight-gradient shares of the gathered rows: per token tile (shared sources), per row tile (per-memory
        # sources); of the tail inputs: per row tile
        dw = torch.zeros(token_tiles, weight.shape[0], W, device=weight.device, dtype=torch.float32)
        dw_rows = (torch.zeros(scatter_tiles, weight.shape[0], W, device=weight.device, dtype=torch.float32)
                   if per_memory else dw)
        dw_tails = (torch.zeros(row_tiles, weight.shape[0], W, device=weight.device, dtype=torch.float32)
                    if tails is not None else dw)
        for (name, offset, width, heads, conv, norm, woff), dout in zip(_groups(fg), (dq, dk, dv, dgates)):
            if width == 0:
                continue
            if offset is None:
                src, dsrc = q_src, d_q_src
            elif ctx.rebuild:  # the gates pass through (no conv): their source is never read, so not rebuilt
                kv_weight = kv.weight(offset, heads * width)
                src, dsrc = kv.group(kv_weight, rebuild=conv)
            else:
                src, dsrc = kv_src[:, :, offset:], d_kv_src[:, :, offset:]
            tok_stride, mem_stride = _strides(src)
            dtok_stride, dmem_stride = _strides(dsrc)
            dout = torch.zeros(L, heads * width, device=q_src.device, dtype=q_src.dtype) if dout is None \
                else dout.contiguous()
            if conv and L > 0:
                dacc = torch.empty_like(dout)
                t_ptr, t_seg, t_row = _tails_args(tails, woff, dout)
                runtime.launch(segment_conv_bwd_rows_kernel, (row_tiles, heads),
                               (src, tok_stride, mem_stride, weight[woff:], t_ptr, t_seg, t_row, dout, dacc,
                                dw_tails[:, woff:], dw_tails.stride(0), tables.row_token, tables.row_memory,
                                tables.row_segment, tables.row_position, L, tables.num_segments, width, L2NORM_EPS),
                               dict(W=W, BR=ROWS_PER_PROGRAM, BC=runtime.tile(width), NORM=norm,
                                    HAS_TAILS=tails is not None), _warps(width))
            else:
                dacc = dout
            if offset is not None and per_memory:
                if L > 0:
                    runtime.launch(segment_conv_bwd_scatter_kernel, (scatter_tiles, heads),
                                   (dacc, weight[woff:] if conv else weight, src, tok_stride, mem_stride, dsrc,
                                    dtok_stride, dmem_stride, dw_rows[:, woff:] if conv else dw_rows,
                                    dw_rows.stride(0), tables.row_token, tables.row_memory, tables.row_segment, L,
                                    width),
                                   dict(W=W, WP=runtime.tile(W, floor=1), BR=SCATTER_ROWS_PER_PROGRAM,
                                        BC=runtime.tile(width), CONV=conv), _warps(width))
            elif num_tokens > 0:
                runtime.launch(segment_conv_bwd_tokens_kernel, (token_tiles, heads),
                               (dacc, weight[woff:] if conv else weight, src, tok_stride, dsrc, dtok_stride,
                                dw[:, woff:] if conv else dw, dw.stride(0), tables.slot_row, tables.row_segment,
                                num_tokens, L, width),
                               dict(S=S, W=W, WP=runtime.tile(W, floor=1), BT=TOKENS_PER_PROGRAM,
                                    BC=runtime.tile(width), CONV=conv), FOUR_WARPS)
            del dacc, src  # this group's scratch is freed before the next group's is made
            if offset is not None and ctx.rebuild:
                kv.backward_group(offset, kv_weight, dsrc)
            del dsrc
        dw = dw.sum(0) + (dw_rows.sum(0) if per_memory else 0) + (dw_tails.sum(0) if tails is not None else 0)
        if ctx.rebuild:
            return d_q_src, None, dw.to(weight.dtype), None, None, None, kv.dx.to(kv.x.dtype), kv.dw
        return d_q_src, d_kv_src, dw.to(weight.dtype), None, None, None, None, None


class _RebuiltProjection:
    """kv_src = x w^T, x (T_tok, D), w (P * F, D), rebuilt one feature group (a column range of every memory's row)
    at a time, with the gradients of x (accumulated in float32 over the groups) and w."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, P: int, F: int):
        self.x, self.w3, self.P = x, w.view(P, F, -1), P
        self.dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        self.dw = torch.zeros_like(w)

    def weight(self, offset: int, width: int) -> torch.Tensor:
        """(P * width, D) the rows of a group of `width` features from `offset` (a copy: made once per group)."""
        return self.w3[:, offset:offset + width].reshape(-1, self.w3.shape[-1])

    def group(self, weight: torch.Tensor, rebuild: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(source (T_tok, P, width) of the group with these weight rows, its gradient buffer (zeros where P > 1:
        unpicked rows get none)); without rebuild the source is not made and the buffer stands in for it."""
        T, P = self.x.shape[0], self.P
        width = weight.shape[0] // P
        dsrc = (torch.zeros if P > 1 else torch.empty)(T, P, width, device=self.x.device, dtype=self.x.dtype)
        if not rebuild:
            return dsrc, dsrc
        return torch.nn.functional.linear(self.x, weight).view(T, P, width), dsrc

    def backward_group(self, offset: int, weight: torch.Tensor, dsrc: torch.Tensor) -> None:
        """Add the group's share of dx; write its rows of dw."""
        T, P, width = dsrc.shape
        d2 = dsrc.view(T, P * width)
        self.dx += d2 @ weight
        self.dw.view_as(self.w3)[:, offset:offset + width] = (d2.t() @ self.x).view(P, width, -1)


def _source(q_src, kv_src, offset):
    """(pointer tensor, token stride, memory stride) of a feature group's source; memory stride 0 when every
    memory reads the same row (q, or a single per-memory row)."""
    src = q_src if offset is None else kv_src[:, :, offset:]
    return (src, *_strides(src))


def _strides(src):
    """(token stride, memory stride) of a (T_tok, C) shared source or a (T_tok, P, C) per-memory one; memory
    stride 0 when there is one memory row (every memory reads it)."""
    return src.stride(0), (src.stride(1) if src.dim() == 3 and src.shape[1] > 1 else 0)


def _tails_args(tails, woff, like):
    if tails is None or woff is None:
        return like, 0, 0
    return tails[:, :, woff:], tails.stride(0), tails.stride(1)


class SegmentCombineFunction(torch.autograd.Function):
    """rows (L, C), slot_row (T_tok, S) int32, weight (T_tok, S) -> out (T_tok, C) in rows' dtype."""

    @staticmethod
    def forward(ctx, rows, slot_row, weight):
        num_tokens, S = slot_row.shape
        C = rows.shape[1]
        out = rows.new_empty(num_tokens, C)
        block = runtime.tile(C, 256)
        if num_tokens > 0:
            runtime.launch(segment_combine_fwd_kernel,
                           (triton.cdiv(num_tokens, TOKENS_PER_PROGRAM), triton.cdiv(C, block)),
                           (rows, slot_row, weight, out, num_tokens, C), dict(S=S, BT=TOKENS_PER_PROGRAM, BC=block),
                           FOUR_WARPS)
        ctx.save_for_backward(rows, slot_row, weight)
        return out

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, dout):
        rows, slot_row, weight = ctx.saved_tensors
        num_tokens, S = slot_row.shape
        C = rows.shape[1]
        block = runtime.tile(C, 256)
        col_tiles = triton.cdiv(C, block)
        drows = torch.empty_like(rows)
        dweight_part = torch.empty(col_tiles, num_tokens, S, device=rows.device, dtype=torch.float32)
        if num_tokens > 0:
            runtime.launch(segment_combine_bwd_kernel, (triton.cdiv(num_tokens, TOKENS_PER_PROGRAM), col_tiles),
                           (rows, slot_row, weight, dout.contiguous(), drows, dweight_part, num_tokens, C),
                           dict(S=S, BT=TOKENS_PER_PROGRAM, BC=block), FOUR_WARPS)
        return drows, None, dweight_part.sum(0).to(weight.dtype)
