"""One decoding step of the MoM mixer: one token per sequence steps only its picked memories.

Each slot takes its memory's conv tail and state from the bank (memory (N, P, H, K, V), conv (N, P, W-1, C)),
convolves its window, steps the memory rule and writes both back; the memories a token did not pick are not
touched. The states are stepped in their bank by memmix.ops.memory_step: on its Triton kernel when no gradient
is wanted (each picked state read once and written once), else by its differentiable gather / step / scatter.
With inplace, the given bank tensors are written and returned (CUDA-graph decoding replays this on a static bank);
otherwise they are left alone and new ones are returned.

With conv_scope "sequence" every memory's convolution moves on at every token: all P tails take the token's
projections (each memory's own), and the picked slots take their memory's convolved features.
"""
from __future__ import annotations

import torch

from memmix.ops.decode import memory_step
from memmix.ops.dtypes import compute_dtype
from memmix.ops.mom.core import MixerSizes, MoMWeights, memory_gates, slot_projections
from memmix.ops.mom.torch_path import sequence_scope_conv
from memmix.ops.short_conv import short_conv_step


def decode_step(x, memory_ids, slot_weights, valid, weights: MoMWeights, sizes: MixerSizes, memory, conv, *,
                use_cache: bool, inplace: bool, impl: str, conv_scope: str = "segment"):
    """x (B, 1, D); memory_ids, slot_weights (B, 1, S); valid (B, 1) bool; memory (B, P, H, K, V) and
    conv (B, P, W-1, C), or None for zeros (dtype: x's promoted to float32); conv_scope as mom_mixer's.

    Returns the mixed outputs (B, 1, Vd), and the new memory and conv (None without use_cache).
    """
    B, _, S = memory_ids.shape
    P, W, H = sizes.num_slot_memories, sizes.conv_size, sizes.num_heads
    Kd, Vd = sizes.key_dim, sizes.value_dim
    if memory is None:
        dtype = compute_dtype(x.dtype)
        memory = torch.zeros(B, P, H, sizes.head_k_dim, sizes.head_v_dim, device=x.device, dtype=dtype)
        conv = torch.zeros(B, P, W - 1, 2 * Kd + Vd, device=x.device, dtype=dtype)
    picked = (torch.arange(B, device=x.device).unsqueeze(1) * P + memory_ids[:, 0]).reshape(-1)  # (B*S,)
    if conv_scope == "sequence":
        slot_conv, gates_in, all_tails = sequence_scope_conv(x, memory_ids, valid, None, weights, sizes,
                                                             conv.reshape(B * P, W - 1, -1))
        conv_out = slot_conv.reshape(B * S, -1)
    else:
        conv_in, gates_in = slot_projections(x, memory_ids, weights, sizes)
        tails = conv.reshape(B * P, W - 1, -1).index_select(0, picked)  # (B*S, W-1, C)
        conv_out, stepped = short_conv_step(conv_in.reshape(B * S, -1), weights.conv, tails)  # (B*S, C)
    q, k, v = (t.reshape(B * S, H, -1) for t in conv_out.split([Kd, Kd, Vd], -1))
    beta, g = memory_gates(gates_in.reshape(B * S, -1), weights, sizes)
    keep = valid.reshape(B, 1).expand(B, S).reshape(-1)
    o, new_memory = _step_memories(q, k, v, g, beta, memory, picked, keep, sizes, use_cache=use_cache,
                                   inplace=inplace, impl=impl)
    o = o.reshape(B, 1, S, Vd) * (slot_weights * valid.unsqueeze(-1)).unsqueeze(-1).to(o.dtype)
    if not use_cache:
        return o.sum(2), None, None
    if conv_scope == "sequence":  # every memory's tail moved (padding rows keep theirs: sequence_conv)
        all_tails = all_tails.view_as(conv).to(conv.dtype)
        return o.sum(2), new_memory, conv.copy_(all_tails) if inplace else all_tails
    new_tails = torch.where(keep.view(-1, 1, 1), stepped.to(conv.dtype), tails)
    flat = conv.reshape(B * P, W - 1, -1)
    if inplace:
        flat.index_copy_(0, picked, new_tails)
        new_conv = conv
    else:
        new_conv = flat.index_copy(0, picked, new_tails).view_as(conv)
    return o.sum(2), new_memory, new_conv


def _step_memories(q, k, v, g, beta, memory, picked, keep, sizes: MixerSizes, *, use_cache: bool, inplace: bool,
                   impl: str):
    """One recurrent step of the picked states of memory (N, P, H, K, V), flat rows `picked` (B*S,).

    q, k (B*S, H, K); v (B*S, H, V); g, beta (B*S, H) or None; keep (B*S,) bool: pads change nothing.
    Returns o (B*S, H, V) and the new memory: `memory` itself when inplace, a new tensor otherwise (the caller's
    is not modified), None without use_cache.
    """
    if not use_cache:
        before = memory.reshape(-1, *memory.shape[2:]).index_select(0, picked)  # (B*S, H, K, V)
        args = [t.unsqueeze(1) for t in (q, k, v, g, beta) if t is not None]  # (B*S, 1, H, ...)
        o, _ = sizes.rule.op(*args, initial_state=before, use_qk_l2norm=True, impl="recurrent")
        return o[:, 0], None
    if not inplace:
        memory = memory.clone(memory_format=torch.contiguous_format)
    step_impl = "auto" if impl in ("auto", "triton") else "recurrent"
    o = memory_step(sizes.rule.name, q, k, v, g, beta, memory.view(-1, *memory.shape[2:]), picked, keep,
                    impl=step_impl)
    return o, memory
