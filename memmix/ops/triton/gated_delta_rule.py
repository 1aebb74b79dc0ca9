"""Chunked gated delta rule on Triton kernels: launch configuration, chunk layout and the autograd Function.

Every call runs on a packed token axis: a dense (B, T) batch is B sequences of length T, a varlen batch
(B == 1) is the sequences that cu_seqlens bounds. The chunk grid is sized from host-side upper bounds and
filled on the device (no host sync).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch.autograd.function import once_differentiable

from memmix.ops.normalize import l2norm
from memmix.ops.triton import MAX_HEAD_DIM, runtime
from memmix.ops.triton.gated_delta_bwd import chunk_grads_kernel, state_grad_kernel
from memmix.ops.triton.gated_delta_fwd import (chunk_output_kernel, state_pass_kernel, wy_prepare_kernel,
                                               wy_recompute_kernel)

CHUNK_SIZE = 64


# --------------------------------------------------------------------------- configuration

MIN_TILE = 32  # the narrowest K or V tile of the chunked kernels (see _tile)


def _tile(dim: int, cap: int) -> int:
    """Power-of-two tile covering up to `cap` of a dimension of size `dim`, at least MIN_TILE. With 16-wide tiles as
    a bf16 dot's inner or outer dim, Triton 3.6 built these kernels for an H100 so that they read out-of-range
    shared memory (compute-sanitizer at K = V = 16: wy_prepare_kernel's stores with a 16-wide K tile, then
    wy_recompute_kernel with a 16-wide V tile; an illegal memory access without the sanitizer). Padded rows and
    columns are masked to zero."""
    return runtime.tile(dim, cap, floor=MIN_TILE)


@dataclass(frozen=True)
class LaunchPolicy:
    """What the launches are sized for. sms: the GPU's SM count (None: no GPU to fill, the sequential kernels keep
    their widest V tiles; _state_config); min_backward_programs: the backward takes the fewest heads a pass whose
    sequential kernels still have this many programs (None: all heads in one pass; 0: one head a pass, the least
    memory; heads_per_backward_pass)."""

    sms: Optional[int] = None
    min_backward_programs: Optional[int] = None

    @classmethod
    def for_device(cls, device: torch.device) -> "LaunchPolicy":
        """On a GPU: its SM count, and two backward programs per SM. Under the interpreter or off CUDA: none."""
        if runtime.INTERPRET or device.type != "cuda":
            return cls()
        sms = runtime.sm_count(device)
        return cls(sms=sms, min_backward_programs=2 * sms)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products; 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _state_config(K: int, V: int, dtype: torch.dtype, programs: Optional[int] = None,
                  sms: Optional[int] = None) -> dict:
    """Tiles and warps for the sequential kernels: the whole K in one tile, V split for parallelism.

    16-bit inputs take V tiles of 64 with 4 warps, which measured faster than 32 with 8 at K = V = 256 (dense and
    packed batches, and the MoM layer; benchmarks/results). programs (sequences x heads of the launch) and sms (the
    GPU's SM count), given on a GPU: 16-bit inputs narrow the V tile (64, 32) while the launch has programs for
    fewer than 3/4 of the SMs, as a long chain then sets the time (few long segments, and low_memory's one head a
    pass, gain from narrower tiles; many segments keep 64). float32 keeps 32 with 8 warps: its exact ("ieee") dots are unrolled FMAs per thread,
    and at 64 x 4 warps the K = 256 kernels did not finish compiling within minutes."""
    if dtype == torch.float32:
        bv, warps = 32, 8
    else:
        bv, warps = 64, 4
        if programs is not None and sms is not None:
            while bv > MIN_TILE and 4 * programs * triton.cdiv(V, bv) < 3 * sms:
                bv //= 2
    return {"BK": _tile(K, MAX_HEAD_DIM), "BV": _tile(V, bv), "num_warps": warps, "num_stages": 2}


def _chunk_config(K: int, V: int) -> dict:
    """Tiles and warps for the per-chunk kernels."""
    return {"BK": _tile(K, 64), "BV": _tile(V, 64), "num_warps": 4 if max(K, V) <= 64 else 8}


def _wy_prepare_config(K: int, V: int) -> dict:
    """wy_prepare_kernel: 4 warps and no software pipelining (see its K loop). 4 warps measured faster here, while
    the other chunk kernels keep 8 (at 4, chunk_grads_kernel was much slower)."""
    return dict(_chunk_config(K, V), num_warps=4, num_stages=1)


def _lighter(config: dict) -> list[dict]:
    """Lighter configs than `config`, to try in turn when it needs more shared memory or registers than the GPU has
    (runtime.launch's fallbacks)."""
    lighter = [dict(config, num_stages=1)]
    if config.get("BV", MIN_TILE) > MIN_TILE:
        lighter.append(dict(config, num_stages=1, BV=config["BV"] // 2))
    return lighter


# --------------------------------------------------------------------------- chunk layout

class ChunkLayout:
    """Where the chunks of a packed batch are, computed on the device.

    cu_seqlens: (N + 1,) int64 sequence bounds; chunk_offsets: (N + 1,) index of each sequence's first chunk;
    chunk_start, chunk_end: (num_chunks,) int32 token bounds per chunk slot (start == end: unused slot).
    chunk_size: tokens a chunk (CHUNK_SIZE for the chunked kernels; the recurrent ones checkpoint at their own).
    seq_order: (N,) int32 the sequences longest first, the order the sequential kernels take them in.
    max_seq_len: host-side upper bound on the longest sequence (T for a dense batch, all tokens for varlen).
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seq_len: int, num_chunks_bound: int,
                 chunk_size: int = CHUNK_SIZE):
        C = self.chunk_size = chunk_size
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
        self.seq_order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)  # (N,)

    @classmethod
    def build(cls, batch: int, seq_len: int, cu_seqlens: Optional[torch.Tensor], device,
              chunk_size: int = CHUNK_SIZE) -> "ChunkLayout":
        """Dense batch (cu_seqlens None): B sequences of length T; else the packed sequences of cu_seqlens.

        The last few layouts are kept, by shape for a dense batch and by cu_seqlens for a packed one (see
        _layout_key): building one takes ~25 small device ops, which cost more host time
        than the kernels of a short batch (and every layer of a model sees the same batch)."""
        key = _layout_key(batch, seq_len, cu_seqlens, device)
        key = None if key is None else key + (chunk_size,)
        if key is not None and key in _LAYOUT_CACHE:
            _LAYOUT_CACHE.move_to_end(key)
            return _LAYOUT_CACHE[key][1]
        layout = cls._build(batch, seq_len, cu_seqlens, device, chunk_size)
        if key is not None:
            _LAYOUT_CACHE[key] = (cu_seqlens, layout)  # the tensor is held so that its id is not reused
            if len(_LAYOUT_CACHE) > LAYOUT_CACHE_SIZE:
                _LAYOUT_CACHE.popitem(last=False)
        return layout

    @classmethod
    def _build(cls, batch: int, seq_len: int, cu_seqlens: Optional[torch.Tensor], device,
               chunk_size: int) -> "ChunkLayout":
        C = chunk_size
        if cu_seqlens is None:
            cu = torch.arange(batch + 1, device=device, dtype=torch.int64) * seq_len
            return cls(cu, seq_len, batch * triton.cdiv(seq_len, C), C)
        cu = cu_seqlens.to(device=device, dtype=torch.int64, copy=True)  # a cached layout owns its bounds
        num_seqs = cu.numel() - 1
        return cls(cu, seq_len, (seq_len + num_seqs * (C - 1)) // C, C)  # sum ceil(L_i / C) <= this


LAYOUT_CACHE_SIZE = 8
_LAYOUT_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def _layout_key(batch: int, seq_len: int, cu_seqlens: Optional[torch.Tensor], device) -> Optional[tuple]:
    """Cache key of a layout, or None when it must not be cached.

    cu_seqlens on the CPU are keyed by their values (no device sync; writes through .numpy() do not bump the
    version). On a GPU by the tensor (object, storage and in-place version): a write that bypasses autograd's
    version counter (.data, DLPack) is not seen. Inference-mode tensors have no version and are not cached."""
    device = torch.device(device)
    if cu_seqlens is None:
        return ("dense", batch, seq_len, device)
    if cu_seqlens.device.type == "cpu":
        return ("values", tuple(cu_seqlens.tolist()), seq_len, device)
    if cu_seqlens.is_inference():
        return None
    return ("tensor", id(cu_seqlens), cu_seqlens.data_ptr(), cu_seqlens._version, seq_len, device)


# --------------------------------------------------------------------------- launchers

def _prepare(q, k, v, g, beta, scale, layout, store_wy=True):
    """b (tokens, H) float32, T and M (tokens, H, C) like k, W like k, U0 like v (W, U0 None unless store_wy).

    T and M are stored in k's dtype: every kernel that reads them casts them to it before its dot anyway."""
    num_tokens, H, K = k.shape
    V = v.shape[-1]
    b = torch.empty(num_tokens, H, device=k.device, dtype=torch.float32) if g is not None else beta
    tinv = torch.empty(num_tokens, H, CHUNK_SIZE, device=k.device, dtype=k.dtype)
    m = torch.empty_like(tinv)
    w, u0 = (torch.empty_like(k), torch.empty_like(v)) if store_wy else (None, None)
    if layout.num_chunks > 0:
        runtime.launch(wy_prepare_kernel, lambda cfg: (layout.num_chunks, H),
                (q, k, v, g if g is not None else beta, beta, b, tinv, m, k if w is None else w,
                 v if u0 is None else u0, layout.chunk_start, layout.chunk_end, scale),
                dict(H=H, K=K, V=V, C=CHUNK_SIZE, HAS_G=g is not None, STORE_WY=store_wy,
                     PREC=_dot_precision(k.dtype)),
                _wy_prepare_config(K, V), _lighter)  # no pipelining: see wy_prepare_kernel's K loop
    return b, tinv, m, w, u0


def _recompute_wy(k, v, beta, b, tinv, w, u0, layout, *, has_g, head0):
    """W and U0 of heads head0 .. head0 + w.shape[1] - 1 into w (tokens, HS, K) and u0 (tokens, HS, V)."""
    num_tokens, H, K = k.shape
    V, heads = v.shape[-1], w.shape[1]
    if layout.num_chunks > 0:
        runtime.launch(wy_recompute_kernel, lambda cfg: (layout.num_chunks, heads),
                (k, v, beta, b if has_g else beta, tinv, w, u0, layout.chunk_start, layout.chunk_end, head0),
                dict(H=H, HS=heads, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, PREC=_dot_precision(k.dtype)),
                _chunk_config(K, V), _lighter)


def _state_pass(q, k, w, u0, b, m, h0, scale, layout, *, has_g, output_in_loop, store_final, sms, scratch=None,
                head0=0, wy_local=False, ht=None):
    """Sequential pass over the chunks: (o, states, u, final state), the unused ones None.

    output_in_loop: o is computed inside the pass; else the per-chunk incoming states (chunks, HS, K, V) like k
    and U (tokens, HS, V) like v are stored, for chunk_output_kernel or the backward: for all heads, or with
    scratch = (states, u) for heads head0 .. head0 + HS - 1 (w and u0 hold those heads only when wy_local).
    store_final: the final states of the pass's heads go into ht (N, H, K, V) float32, made when not given.
    """
    num_tokens, H, K = k.shape
    V = u0.shape[-1]
    N = layout.num_seqs
    o = torch.empty_like(u0) if output_in_loop else None
    states = u = None
    if scratch is not None:
        states, u = scratch
    elif not output_in_loop:
        states, u = k.new_empty(layout.num_chunks, H, K, V), torch.empty_like(u0)
    heads = H if states is None else states.shape[1]
    if store_final and ht is None:
        ht = k.new_empty(N, H, K, V, dtype=torch.float32)
    dummy = u0
    runtime.launch(state_pass_kernel, lambda cfg: (N * heads * triton.cdiv(V, cfg["BV"]),),
            (q, k, w, u0, b, m, h0 if h0 is not None else dummy, o if o is not None else dummy,
             states if states is not None else dummy, u if u is not None else dummy,
             ht if ht is not None else dummy, layout.cu_seqlens, layout.chunk_offsets, layout.seq_order, scale,
             head0),
            dict(H=H, HS=heads, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, HAS_H0=h0 is not None, STORE_FINAL=store_final,
                 OUTPUT=output_in_loop, STORE_STATES=not output_in_loop, WY_LOCAL=wy_local,
                 PREC=_dot_precision(k.dtype)),
            _state_config(K, V, k.dtype, N * heads, sms), _lighter)
    return o, states, u, ht


def _output(q, b, m, states, u, scale, layout, *, has_g, o=None, head0=0):
    """o (tokens, H, V) like u of every chunk in parallel from the stored per-chunk states and U, which hold heads
    head0 .. head0 + HS - 1 (all heads by default); written into o when it is given."""
    num_tokens, H, K = q.shape
    V, heads = u.shape[-1], u.shape[1]
    if o is None:
        o = u.new_empty(num_tokens, H, V)
    if layout.num_chunks > 0:
        runtime.launch(chunk_output_kernel, lambda cfg: (layout.num_chunks, heads, triton.cdiv(V, cfg["BV"])),
                (q, b, m, states, u, o, layout.chunk_start, layout.chunk_end, scale, head0),
                dict(H=H, HS=heads, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, PREC=_dot_precision(q.dtype)),
                _chunk_config(K, V), _lighter)
    return o


def _pass_scratch(k, v, layout, heads: int):
    """Scratch of a pass over `heads` heads: W (tokens, heads, K) like k, U0 and U (tokens, heads, V) like v, the
    per-chunk states (chunks, heads, K, V) like k."""
    num_tokens, _, K = k.shape
    V = v.shape[-1]
    w, u0 = k.new_empty(num_tokens, heads, K), v.new_empty(num_tokens, heads, V)
    return w, u0, k.new_empty(layout.num_chunks, heads, K, V), torch.empty_like(u0)


def _forward_by_head(q, k, v, beta, b, tinv, m, h0, scale, layout, *, has_g, store_final, sms):
    """The chunked forward one head at a time (low memory): W, U0, the per-chunk states and U are held for one
    head, W and U0 recomputed from the stored T as in the backward. Returns o (tokens, H, V) like v and the final
    states (N, H, K, V) float32 or None."""
    num_tokens, H, K = k.shape
    V = v.shape[-1]
    w, u0, states, u = _pass_scratch(k, v, layout, heads=1)
    ht = k.new_empty(layout.num_seqs, H, K, V, dtype=torch.float32) if store_final else None
    o = v.new_empty(num_tokens, H, V)
    for head in range(H):
        _recompute_wy(k, v, beta, b, tinv, w, u0, layout, has_g=has_g, head0=head)
        _state_pass(q, k, w, u0, b, m, h0, scale, layout, has_g=has_g, output_in_loop=False, store_final=store_final,
                    sms=sms,
                    scratch=(states, u), head0=head, wy_local=True, ht=ht)
        _output(q, b, m, states, u, scale, layout, has_g=has_g, o=o, head0=head)
    return o, ht


def _state_grad(q, k, w, b, m, do, dht, dh0, scale, layout, du, dstates, *, has_g, head0, wy_local, sms):
    """Backward sequential pass over heads head0 .. head0 + HS - 1: dU into du (tokens, HS, V), per-chunk dS'
    into dstates (chunks, HS, K, V), dS0 into dh0 (N, H, K, V) float32 when it is given."""
    num_tokens, H, K = k.shape
    V = do.shape[-1]
    N, heads = layout.num_seqs, du.shape[1]
    runtime.launch(state_grad_kernel, lambda cfg: (N * heads * triton.cdiv(V, cfg["BV"]),),
            (q, k, w, b, m, do, dht if dht is not None else do, du, dstates, dh0 if dh0 is not None else do,
             layout.cu_seqlens, layout.chunk_offsets, layout.seq_order, scale, head0),
            dict(H=H, HS=heads, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, HAS_DHT=dht is not None,
                 STORE_DH0=dh0 is not None, WY_LOCAL=wy_local, PREC=_dot_precision(k.dtype)),
            _state_config(K, V, k.dtype, N * heads, sms), _lighter)


def _chunk_grads(q, k, v, beta, b, tinv, u, du, do, states, dstates, scale, layout, grads, *, has_g, head0):
    """Into grads = (dq, dk (like k), dv (like v), dbeta, dg (tokens, H) float32): the gradients of heads
    head0 .. head0 + HS - 1, from u, du (tokens, HS, V) and states, dstates (chunks, HS, K, V)."""
    num_tokens, H, K = k.shape
    V, heads = v.shape[-1], u.shape[1]
    dq, dk, dv, dbeta, dg = grads
    if layout.num_chunks > 0:
        runtime.launch(chunk_grads_kernel, lambda cfg: (layout.num_chunks, heads),
                (q, k, v, beta, b, tinv, u, du, do, states, dstates, dq, dk, dv, dbeta,
                 dg if dg is not None else dbeta, layout.chunk_start, layout.chunk_end, scale, head0),
                dict(H=H, HS=heads, K=K, V=V, C=CHUNK_SIZE, HAS_G=has_g, PREC=_dot_precision(k.dtype)),
                _chunk_config(K, V), _lighter)


def heads_per_backward_pass(num_seqs: int, H: int, K: int, V: int, dtype: torch.dtype,
                            min_programs: Optional[int]) -> int:
    """How many heads the backward takes per pass: the fewest (a divisor of H) whose sequential kernels still
    have N x heads x V tiles >= min_programs programs (None: all H at once), counting the V tiles of the widest
    config (the launches may then narrow them: _state_config). The per-chunk states, their gradients, W, U0, U and
    dU are held for one pass's heads only: fewer heads a pass hold less memory, more heads keep the GPU busier
    (min_programs = 0 gives one head a pass, the least memory)."""
    target = min_programs
    if target is None:
        return H
    v_tiles = triton.cdiv(V, _state_config(K, V, dtype)["BV"])
    for heads in range(1, H + 1):
        if H % heads == 0 and num_seqs * heads * v_tiles >= target:
            return heads
    return H


# --------------------------------------------------------------------------- autograd

class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Autograd over the packed kernels; inputs are (tokens, H, D) contiguous, g may be None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, layout, low_memory, policy):
        has_g = g is not None
        # O = diag(scale exp(b)) Q S + M U needs each chunk's incoming state S. Inside the sequential pass it doubles
        # the dots of every step of the chain (and adds Q and M, ~40% of its loads at K = V = 256); storing S (K x V
        # per chunk, in k's dtype like the backward recompute) and U moves it to a parallel kernel. With at most one
        # chunk per sequence there is no chain to shorten, so the pass computes O itself and writes no states.
        in_loop = layout.max_seq_len <= CHUNK_SIZE
        by_head = low_memory and not in_loop
        b, tinv, m, w, u0 = _prepare(q, k, v, g, beta, scale, layout, store_wy=not by_head)
        if by_head:
            o, ht = _forward_by_head(q, k, v, beta, b, tinv, m, initial_state, scale, layout, has_g=has_g,
                                     store_final=output_final_state, sms=policy.sms)
        else:
            o, states, u, ht = _state_pass(q, k, w, u0, b, m, initial_state, scale, layout, has_g=has_g,
                                           output_in_loop=in_loop, store_final=output_final_state, sms=policy.sms)
            if not in_loop:
                o = _output(q, b, m, states, u, scale, layout, has_g=has_g)
        # W and U0 are not saved: the backward recomputes them from T for the heads of each of its passes
        ctx.save_for_backward(q, k, v, beta, initial_state, b, tinv, m)
        ctx.scale, ctx.layout, ctx.has_g = scale, layout, has_g
        ctx.one_head_per_pass, ctx.policy = low_memory, policy
        ctx.g_dtype = None if g is None else g.dtype
        return o, ht

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, do, dht):
        q, k, v, beta, h0, b, tinv, m = ctx.saved_tensors
        scale, layout, has_g = ctx.scale, ctx.layout, ctx.has_g
        num_tokens, H, K = k.shape
        V = v.shape[-1]
        do = do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                 torch.empty(num_tokens, H, device=k.device, dtype=torch.float32),
                 torch.empty(num_tokens, H, device=k.device, dtype=torch.float32) if has_g else None)
        dh0 = None if h0 is None else k.new_empty(layout.num_seqs, H, K, V, dtype=torch.float32)
        policy = ctx.policy
        heads = 1 if ctx.one_head_per_pass else heads_per_backward_pass(layout.num_seqs, H, K, V, k.dtype,
                                                                         policy.min_backward_programs)
        w, u0, states, u = _pass_scratch(k, v, layout, heads)
        dstates, du = torch.empty_like(states), torch.empty_like(u)
        for head0 in range(0, H, heads):
            _recompute_wy(k, v, beta, b, tinv, w, u0, layout, has_g=has_g, head0=head0)
            _state_pass(q, k, w, u0, b, m, h0, scale, layout, has_g=has_g, output_in_loop=False, store_final=False,
                        sms=policy.sms, scratch=(states, u), head0=head0, wy_local=True)
            _state_grad(q, k, w, b, m, do, dht, dh0, scale, layout, du, dstates, has_g=has_g, head0=head0,
                        wy_local=True, sms=policy.sms)
            _chunk_grads(q, k, v, beta, b, tinv, u, du, do, states, dstates, scale, layout, grads, has_g=has_g,
                         head0=head0)
        dq, dk, dv, dbeta, dg = grads
        dg = None if dg is None else dg.to(ctx.g_dtype)
        dh0 = None if dh0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, dg, dbeta.to(beta.dtype), None, dh0, None, None, None, None


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                           beta: torch.Tensor, scale: Optional[float] = None,
                           initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                           cu_seqlens: Optional[torch.Tensor] = None, use_qk_l2norm: bool = False,
                           low_memory: bool = False, policy: Optional[LaunchPolicy] = None):
    """Gated delta rule (delta rule when g is None) on the chunked Triton kernels; differentiable.

    q, k: (B, T, H, K); v: (B, T, H, V) bf16/fp16/fp32 with K, V <= 256; g: (B, T, H) log decay or None;
    beta: (B, T, H); initial_state: (N, H, K, V) or None; cu_seqlens: (N + 1,) int with B == 1, or None;
    low_memory: forward and backward one head at a time (the per-chunk states, their gradients and the WY
    scratch are held for one head: least memory; the sequential kernels get fewer programs); policy: the launch
    sizing (LaunchPolicy; default: LaunchPolicy.for_device(q.device)).
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) float32 (None unless asked for).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"q/k and v head dims must be <= {MAX_HEAD_DIM} for the Triton kernels, got K={K}, V={V}")
    tensors, scale, h0, layout = packed_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
                                               CHUNK_SIZE)
    o, ht = ChunkGatedDeltaRuleFunction.apply(*tensors, scale, h0, output_final_state, layout, low_memory,
                                              policy or LaunchPolicy.for_device(q.device))
    return o.reshape(B, T, H, V).to(v.dtype), ht


def packed_inputs(q, k, v, g, beta, scale: Optional[float], initial_state, cu_seqlens: Optional[torch.Tensor],
                  use_qk_l2norm: bool, chunk_size: int):
    """The Triton entries' common preparation: (q, k, v, g, beta) on the packed token axis (B * T, H, D),
    contiguous, q and k L2-normalised when use_qk_l2norm, v in q's dtype; the scale (K ** -0.5 by default);
    initial_state contiguous; the ChunkLayout of `chunk_size`-token chunks."""
    B, T = q.shape[:2]
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)

    def packed(x):
        return None if x is None else x.reshape((B * T,) + tuple(x.shape[2:])).contiguous()

    tensors = (packed(q), packed(k), packed(v.to(q.dtype)), packed(g), packed(beta))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    h0 = None if initial_state is None else initial_state.contiguous()
    return tensors, scale, h0, ChunkLayout.build(B, T, cu_seqlens, q.device, chunk_size=chunk_size)
