"""The MoM mixer's PyTorch path (any device; impl "chunk" / "recurrent", and "auto" without Triton; every impl but
"naive" for conv_scope "sequence").

Dispatch copies every slot's projections into the segment-grouped buffer, one short convolution
(memmix.ops.short_conv) runs over all segments at once, the memory rule runs every segment in one call, and a weighted gather mixes the memories' outputs back.
With conv_scope "sequence" every memory's projections are convolved along the whole sequence first (one conv1d with
a memory's channels side by side) and each slot's convolved features are dispatched instead.
"""
from __future__ import annotations

import torch
from memmix.ops.mom.core import (
    MixerSizes,
    MoMWeights,
    memory_conv_inputs,
    memory_gates,
    run_recurrence,
    slot_projections,
)
from memmix.ops.mom.plan import DispatchPlan, plan_dispatch
from memmix.ops.short_conv import short_conv_segments, short_conv_step


def torch_memories(x, memory_ids, slot_weights, valid, cu_seqlens, plan: DispatchPlan, weights: MoMWeights,
                   sizes: MixerSizes, tails, initial, *, use_cache: bool, low_memory: bool, impl: str,
                   conv_scope: str = "segment"):
    """x (B, T, D); memory_ids, slot_weights (B, T, S); valid (B, T) bool; cu_seqlens (N + 1,) or None; tails
    (R, W-1, C) and initial (R, H, K, V) or None; conv_scope "segment" or "sequence" (see mom_mixer).

    Returns the mixed outputs (B, T, Vd), the final states (R, H, K, V) or None, the new tails (R, W-1, C).
    """
    Kd, Vd = sizes.key_dim, sizes.value_dim
    if conv_scope == "segment":
        conv_in, gates_in = slot_projections(x, memory_ids, weights, sizes)
        conv_out, new_tails = short_conv_segments(plan.dispatch(conv_in), weights.conv, plan.starts, plan.counts, tails)
    else:
        slot_conv, gates_in, new_tails = sequence_scope_conv(x, memory_ids, valid, cu_seqlens, weights, sizes, tails)
        conv_out = plan.dispatch(slot_conv)
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


def sequence_conv(x: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                  tails: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv + SiLU along the real tokens of each sequence (of each packed document), continuing
    from its tail: short_conv_segments with one segment per sequence. Padding is skipped, as the memories skip it.

    x (B, T, C); weight (C, W); valid (B, T) bool; cu_seqlens (N + 1,) int or None (then N = B); tails (N, W-1, C):
    the last W-1 inputs before x, oldest first, or None for zeros.
    Returns y (B, T, C), 0 at padding, and the new tails (N, W-1, C), in x's dtype. Reads no host value.
    """
    B, T, C = x.shape
    if T == 1 and cu_seqlens is None:  # a decoding step: one window per sequence
        if tails is None:
            tails = x.new_zeros(B, weight.shape[-1] - 1, C)
        y, new_tails = short_conv_step(x[:, 0], weight, tails)
        return y[:, None] * valid.unsqueeze(-1).to(x.dtype), torch.where(valid.view(B, 1, 1), new_tails,
                                                                          tails.to(x.dtype))
    plan = plan_dispatch(torch.zeros(B, T, 1, dtype=torch.long, device=x.device), valid, 1, cu_seqlens, "packed")
    out, new_tails = short_conv_segments(plan.dispatch(x.unsqueeze(2)), weight, plan.starts, plan.counts, tails)
    return plan.collect(out).squeeze(2), new_tails


def sequence_scope_conv(x, memory_ids, valid, cu_seqlens, weights: MoMWeights, sizes: MixerSizes, tails):
    """conv_scope "sequence": every memory's q | k | v projection convolved (+ SiLU) along all real tokens of its
    sequence, then each slot takes its token's features under its memory.

    The P memories' channels sit side by side (P * C channels, the conv weights repeated), so one sequence_conv
    convolves them all. x (B, T, D); memory_ids (B, T, S); valid (B, T); tails (N * P, W-1, C) or None.
    Returns the slots' features (B, T, S, C), their gate inputs (B, T, S, G) and the new tails (N * P, W-1, C).
    """
    conv_in, gates = memory_conv_inputs(x, memory_ids, weights, sizes)  # (B, T, P, C)
    B, T, P, C = conv_in.shape
    S, W = memory_ids.shape[-1], sizes.conv_size
    if tails is not None:
        tails = tails.view(-1, P, W - 1, C).transpose(1, 2).reshape(-1, W - 1, P * C)
    y, new_tails = sequence_conv(conv_in.reshape(B, T, P * C), weights.conv.repeat(P, 1), valid, cu_seqlens, tails)
    slots = y.view(B, T, P, C).gather(2, memory_ids.unsqueeze(-1).expand(B, T, S, C))
    return slots, gates, new_tails.view(-1, W - 1, P, C).transpose(1, 2).reshape(-1, W - 1, C)
