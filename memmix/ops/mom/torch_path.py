"""The MoM mixer's PyTorch path (any device; impl "chunk" / "recurrent", and "auto" without Triton).

Dispatch copies every slot's projections into the segment-grouped buffer, one conv1d convolves all segments at
once, the memory rule runs every segment in one call, and a weighted gather mixes the memories' outputs back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memmix.ops.mom.core import MixerSizes, MoMWeights, memory_gates, run_recurrence, slot_projections
from memmix.ops.mom.plan import DispatchPlan


def torch_memories(x, memory_ids, slot_weights, plan: DispatchPlan, weights: MoMWeights, sizes: MixerSizes, tails,
                   initial, *, use_cache: bool, low_memory: bool, impl: str):
    """x (B, T, D); memory_ids, slot_weights (B, T, S); tails (R, W-1, C) and initial (R, H, K, V) or None.

    Returns the mixed outputs (B, T, Vd), the final states (R, H, K, V) or None, the new tails (R, W-1, C).
    """
    Kd, Vd = sizes.key_dim, sizes.value_dim
    conv_in, gates_in = slot_projections(x, memory_ids, weights, sizes)
    conv_out, new_tails = segment_conv(plan, plan.dispatch(conv_in), weights.conv, tails)
    q, k, v = conv_out.split([Kd, Kd, Vd], dim=-1)
    beta, g = memory_gates(plan.dispatch(gates_in), weights, sizes)
    if plan.layout == "dense":  # unused cells must leave the state unchanged
        filled = plan.filled_rows().unsqueeze(-1)
        k = k * filled
        beta = None if beta is None else beta * filled
        g = None if g is None else g * filled
    o, final = run_recurrence(plan, q, k, v, g, beta, initial, sizes, use_cache=use_cache, normalized=False,
                              low_memory=low_memory, impl=impl)
    return plan.combine(o.reshape(plan.buffer_len, -1), slot_weights), final, new_tails


def segment_conv(plan: DispatchPlan, x: torch.Tensor, weight: torch.Tensor,
                 tails: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv + SiLU over every segment, continuing from its tail.

    x (buffer_len, C) grouped by segment; weight (C, W); tails (R, W-1, C) or None.
    Returns the outputs (buffer_len, C) and the new tails (R, W-1, C).
    Each segment gets W-1 rows in front of it holding its tail, so one convolution over the whole
    buffer never mixes segments.
    """
    W = weight.shape[-1]
    R = plan.num_segments
    C = x.shape[-1]
    row = torch.arange(plan.buffer_len, device=x.device)
    seg_of_row = torch.bucketize(row, plan.starts[1:], right=True)  # (buffer_len,) in [0, R]
    shifted = row + (seg_of_row + 1) * (W - 1)
    ext_len = plan.buffer_len + (R + 1) * (W - 1)
    ext = x.new_zeros(ext_len, C).index_copy(0, shifted, x)
    tail_rows = (plan.starts[:R] + torch.arange(R, device=x.device) * (W - 1)).unsqueeze(1) + torch.arange(
        W - 1, device=x.device
    )  # (R, W-1)
    if tails is not None:
        ext = ext.index_copy(0, tail_rows.reshape(-1), tails.reshape(-1, C).to(ext.dtype))
    weight = weight.unsqueeze(1).to(ext.dtype)  # (C, 1, W)
    y = F.conv1d(ext.t().unsqueeze(0), weight, padding=W - 1, groups=C)[0, :, :ext_len].t()
    out = F.silu(y.index_select(0, shifted))
    new_tails = ext.index_select(0, (tail_rows + plan.counts.unsqueeze(1)).reshape(-1)).view(R, W - 1, C)
    return out, new_tails
