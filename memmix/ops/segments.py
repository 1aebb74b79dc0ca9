"""Gathered segment convolution and weighted combine: the data movement around a MoM layer's recurrence.

A buffer of L rows is cut into segments (runs of consecutive rows); row r holds the features of source
token row_token[r] under memory row_memory[r]. `segment_conv` builds the rows' q, k, v straight from the
projections (no dispatched copy of them): gather, causal depthwise convolution + SiLU inside each segment
(continuing from per-segment tails), L2 normalisation of q and k per head; gate features pass through.
`segment_combine` is the way back: out[t] = sum_s weight[t, s] * rows[slot_row[t, s]].

Both run on Triton kernels (CUDA, or Triton's CPU interpreter under TRITON_INTERPRET=1) and are
differentiable; the PyTorch path of memmix.layers.mom computes the same functions with index_copy and conv1d.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SegmentRows:
    """Where each buffer row comes from, and each token's rows (int32 tensors on the device).

    row_token, row_memory: (L,) source token and memory of row r;  row_segment: (L,) its segment (the
    first num_segments segments have tails, a higher id -- padding's trash area -- has none);
    row_position: (L,) r minus its segment's first row;  slot_row: (T_tok, S) the row of each token's S slots.
    Every row is exactly one slot (a bijection).
    """

    row_token: torch.Tensor
    row_memory: torch.Tensor
    row_segment: torch.Tensor
    row_position: torch.Tensor
    slot_row: torch.Tensor
    num_segments: int

    @property
    def num_rows(self) -> int:
        return self.row_token.numel()


@dataclass(frozen=True)
class FeatureGroups:
    """Channel layout. q: num_heads x head_k from the shared source; the per-memory source holds k
    (num_heads x head_k), v (num_heads x head_v), then num_gates gate features, in that order."""

    num_heads: int
    head_k: int
    head_v: int
    num_gates: int
    conv_size: int


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
    from memmix.ops.triton.segment_conv import SegmentConvFunction

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
    return SegmentConvFunction.apply(q_src.contiguous(), kv_src.contiguous(), weight.contiguous(), rows, groups,
                                     tails, x, w)


def segment_combine(rows: torch.Tensor, slot_row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_s weight[t, s] * rows[slot_row[t, s]]: rows (L, C), slot_row (T_tok, S) int32,
    weight (T_tok, S) -> (T_tok, C) in rows' dtype."""
    from memmix.ops.triton.segment_conv import SegmentCombineFunction

    return SegmentCombineFunction.apply(rows.contiguous(), slot_row.contiguous(), weight.contiguous())
