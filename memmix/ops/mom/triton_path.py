"""The MoM mixer's Triton path (CUDA, or Triton's CPU interpreter under TRITON_INTERPRET=1): gathered segment
convolution, the recurrence, and a weighted combine.

A buffer of L rows is cut into segments (runs of consecutive rows); row r holds the features of source
token row_token[r] under memory row_memory[r]. `segment_conv` builds the rows' q, k, v straight from the
projections (no dispatched copy of them): gather, causal depthwise convolution + SiLU inside each segment
(continuing from per-segment tails), L2 normalisation of q and k per head; gate features pass through.
`segment_combine` is the way back: out[t] = sum_s weight[t, s] * rows[slot_row[t, s]].

Both run on the kernels memmix.ops.triton registers ("mom_segment_conv", "mom_segment_combine") and are
differentiable; the PyTorch path (torch_path.py) computes the same functions with index_copy and conv1d. Nothing
here reads a host value from the device: the path can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from memmix.ops.mom.core import MixerSizes, MoMWeights, memory_gates, run_recurrence
from memmix.ops.mom.plan import DispatchPlan, SegmentRows
from memmix.ops.registry import find_kernel


@dataclass(frozen=True)
class FeatureGroups:
    """Channel layout. q: num_heads x head_k from the shared source; the per-memory source holds k
    (num_heads x head_k), v (num_heads x head_v), then num_gates gate features, in that order."""

    num_heads: int
    head_k: int
    head_v: int
    num_gates: int
    conv_size: int


def runs_on(x: torch.Tensor) -> bool:
    """True when the segment kernels are registered and take x (its device and dtype: Kernel.fits)."""
    kernel = find_kernel("mom_segment_conv")
    return kernel is not None and kernel.fits(x)


def triton_memories(x, memory_ids, slot_weights, valid, plan: DispatchPlan, weights: MoMWeights, sizes: MixerSizes,
                    tails, initial, *, use_cache: bool, low_memory: bool, impl: str):
    """q, k, v gathered and convolved straight from the projections, the recurrence, the fused weighted combine.

    x (B, T, D); memory_ids, slot_weights (B, T, S); valid (B, T) bool; tails (R, W-1, C) (not differentiated) and
    initial (R, H, K, V) or None. low_memory: the convolution keeps x and the weights instead of the every-memory
    k/v projection and rebuilds it in its backward; the recurrence runs one head at a time.
    Returns the mixed outputs (B, T, Vd), the final states (R, H, K, V) or None, the new tails (R, W-1, C) or None.
    """
    B, T, D = x.shape
    Kd, Vd = sizes.key_dim, sizes.value_dim
    rows = plan.segment_rows(memory_ids)
    q_src = F.linear(x, weights.q_proj).reshape(B * T, Kd)
    x_flat, kv_weight = x.reshape(B * T, D), weights.kv_proj.reshape(-1, D)
    if low_memory and torch.is_autocast_enabled(x.device.type):
        # the projection's inputs as autocast casts them: the convolution keeps these and rebuilds kv_src from
        # them exactly as the forward made it
        dtype = torch.get_autocast_dtype(x.device.type)
        x_flat, kv_weight = x_flat.to(dtype), kv_weight.to(dtype)
    # low_memory: the convolution keeps x and the weights, not the every-memory projection, and differentiates
    # them itself (rebuilding the projection one feature group at a time); the projection is then made without
    # a graph, unless the returned conv tails (use_cache) need one
    with torch.set_grad_enabled(torch.is_grad_enabled() and (use_cache or not low_memory)):
        kv_src = F.linear(x_flat, kv_weight).view(B * T, weights.kv_proj.shape[0], -1)
    groups = FeatureGroups(sizes.num_heads, sizes.head_k_dim, sizes.head_v_dim, kv_src.shape[-1] - Kd - Vd,
                           sizes.conv_size)
    kv_inputs = (x_flat, kv_weight) if low_memory else None
    q, k, v, gates = segment_conv(q_src, kv_src, weights.conv, rows, groups,
                                  None if tails is None else tails.detach(), kv_inputs)
    new_tails = last_inputs(plan, rows, q_src, kv_src, tails, sizes) if use_cache else None
    del kv_src  # unless the convolution kept it, it is freed before the recurrence allocates its scratch
    beta, g = memory_gates(gates, weights, sizes)
    o, final = run_recurrence(plan, q, k, v, g, beta, initial, sizes, use_cache=use_cache, normalized=True,
                              low_memory=low_memory, impl=impl)
    mixing = (slot_weights * valid.unsqueeze(-1)).reshape(B * T, -1)
    mixed = segment_combine(o.reshape(plan.buffer_len, -1), rows.slot_row, mixing).view(B, T, -1)
    return mixed, final, new_tails


def last_inputs(plan: DispatchPlan, rows: SegmentRows, q_src, kv_src, tails, sizes: MixerSizes) -> torch.Tensor:
    """(R, W-1, C) the last W-1 conv inputs of every segment, reaching into the old tails when a segment
    is shorter than that."""
    W, R = sizes.conv_size, plan.num_segments
    position = plan.counts[:R].unsqueeze(1) + torch.arange(W - 1, device=q_src.device)  # in [tails; segment]
    row = (plan.starts[:R].unsqueeze(1) + position - (W - 1)).clamp(0, max(plan.buffer_len - 1, 0))
    tok, mem = rows.row_token[row].long(), rows.row_memory[row].long()
    if kv_src.shape[1] == 1:
        mem = torch.zeros_like(mem)
    inputs = torch.cat([q_src[tok], kv_src[tok, mem, : sizes.key_dim + sizes.value_dim]], dim=-1)
    if tails is None:
        tails = inputs.new_zeros(R, W - 1, inputs.shape[-1])
    old = tails.to(inputs.dtype).gather(1, position.clamp(max=W - 2).unsqueeze(-1).expand_as(inputs))
    return torch.where((position >= W - 1).unsqueeze(-1), inputs, old)


def segment_conv(q_src: torch.Tensor, kv_src: torch.Tensor, weight: torch.Tensor, rows: SegmentRows,
                 groups: FeatureGroups, tails: Optional[torch.Tensor] = None,
                 kv_inputs: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
    """Gather, convolve (causal, depthwise, per segment) + SiLU, L2-normalise q and k; pass gates through.

    q_src: (T_tok, H*K) shared by every memory; kv_src: (T_tok, P, H*K + H*V + G) per memory (k | v | gates);
    weight: (2HK + HV, W) conv weights of q | k | v; tails: (num_segments, W - 1, 2HK + HV) inputs before each
    segment, oldest first (not differentiated), or None for zeros.
    kv_inputs: (x (T_tok, D), w (P * F, D)) with kv_src = (x w^T).view(kv_src.shape), or None. When given, x and
    w are kept instead of kv_src and receive its gradient (kv_src itself is not differentiated: compute it under
    torch.no_grad()); the backward rebuilds kv_src one feature group at a time (less memory, one more product).
    Returns q, k (L, H*K), v (L, H*V), gates (L, G), in q_src's dtype.
    """
    if tails is not None and tails.requires_grad:
        raise ValueError("segment_conv: tails must not require grad (the PyTorch path differentiates them)")
    tails = None if tails is None else tails.to(q_src.dtype).contiguous()
    if kv_inputs is not None:
        x, w = kv_inputs
        if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or (x.shape[0], w.shape[0]) != (
                kv_src.shape[0], kv_src.shape[1] * kv_src.shape[2]):
            raise ValueError(f"segment_conv: kv_inputs must be x (T_tok, D) and w (P * F, D) of kv_src "
                             f"{tuple(kv_src.shape)}, got {tuple(x.shape)} and {tuple(w.shape)}")
        if not x.dtype == w.dtype == kv_src.dtype:  # the backward rebuilds kv_src from x and w as they are
            raise ValueError(f"segment_conv: kv_inputs x and w must have kv_src's dtype {kv_src.dtype} (cast them "
                             f"as the product was made), got {x.dtype} and {w.dtype}")
        kv_src, x, w = kv_src.detach(), x.contiguous(), w.contiguous()  # the gradient goes to x and w
    else:
        x = w = None
    return _kernel("mom_segment_conv")(q_src.contiguous(), kv_src.contiguous(), weight.contiguous(), rows, groups,
                                       tails, x, w)


def segment_combine(rows: torch.Tensor, slot_row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_s weight[t, s] * rows[slot_row[t, s]]: rows (L, C), slot_row (T_tok, S) int32,
    weight (T_tok, S) -> (T_tok, C) in rows' dtype."""
    return _kernel("mom_segment_combine")(rows.contiguous(), slot_row.contiguous(), weight.contiguous())


def _kernel(name: str):
    kernel = find_kernel(name)
    if kernel is None:
        raise RuntimeError(f"the MoM mixer's Triton path needs Triton (memmix.ops.triton registers {name!r}); "
                           "use impl='chunk' or 'recurrent' (or 'auto')")
    return kernel.fn
