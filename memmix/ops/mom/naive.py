"""The MoM mixer as the paper writes it (Du et al., arXiv 2502.13685): a loop over sequences, memories and tokens.

The reference the fast paths are tested against; slow, written for reading. Every memory walks its own
sub-sequence (the tokens that picked it, in time order): it convolves its own recent inputs, steps its rule and
adds its read-out, scaled by the token's routing weight, to the token's output.

conv_scope="sequence" (an ablation, not the paper) changes one thing: a memory's convolution history takes its
projection of every real token of the sequence, picked or not, so the convolution runs along the whole sequence;
the memory still steps its rule only at the tokens that picked it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from memmix.ops.dtypes import compute_dtype
from memmix.ops.mom.core import MoMWeights
from memmix.ops.normalize import l2norm
from memmix.ops.registry import get_rule
from memmix.ops.short_conv import short_conv_step


def naive_mom(x: torch.Tensor, memory_ids: torch.Tensor, routing_weights: torch.Tensor, weights: MoMWeights, *,
              rule: str, num_heads: int, num_memories: int, shared_memory: bool = True,
              memory: Optional[torch.Tensor] = None, conv: Optional[torch.Tensor] = None,
              valid: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
              conv_scope: str = "segment"):
    """Arguments and results as memmix.ops.mom.mom_mixer (without its speed options).

    x (B, T, D); memory_ids, routing_weights (B, T, k): each token's picks among the M = num_memories routed
    memories; the shared memory (number M, weight 1) sees every token. memory (N, P, H, K, V) and conv
    (N, P, W-1, C): the incoming state, or None for zeros. valid (B, T) bool: False tokens touch nothing.
    cu_seqlens (N + 1,): packed documents (B == 1), each memory starting afresh in each.
    conv_scope: "segment" (the paper: a memory convolves the inputs of its own tokens) or "sequence" (of every token).
    Returns (o (B, T, H * V) in x's dtype, memory, conv) with the final state in x's dtype promoted to float32.
    """
    rule = get_rule(rule)
    B, T, D = x.shape
    H, M = num_heads, num_memories
    P = M + int(shared_memory)
    Kd = weights.q_proj.shape[0]
    Vd = weights.conv.shape[0] - 2 * Kd
    K, V, W = Kd // H, Vd // H, weights.conv.shape[-1]
    dtype = compute_dtype(x.dtype)
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid.cpu()
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [
        (0, int(start), int(end)) for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    if memory is None:
        memory = torch.zeros(len(bounds), P, H, K, V, dtype=dtype, device=x.device)
        conv = torch.zeros(len(bounds), P, W - 1, 2 * Kd + Vd, dtype=dtype, device=x.device)
    out = torch.zeros(B, T, H, V, dtype=dtype, device=x.device)
    new_memory, new_conv = torch.zeros_like(memory, dtype=dtype), torch.zeros_like(conv, dtype=dtype)
    for n, (b, start, end) in enumerate(bounds):
        for p in range(P):
            S = memory[n, p].to(dtype)  # (H, K, V)
            history = list(conv[n, p].to(dtype))  # the memory's last W - 1 convolution inputs, oldest first
            for t in range(start, end):
                picks = memory_ids[b, t].tolist()
                picked = p == M or p in picks
                if not valid[b, t] or (not picked and conv_scope == "segment"):
                    continue
                xt = x[b, t].to(dtype)
                proj = weights.kv_proj[0 if weights.kv_proj.shape[0] == 1 else p].to(dtype) @ xt  # k | v | gates
                conv_in = torch.cat([weights.q_proj.to(dtype) @ xt, proj[: Kd + Vd]])  # (C,)
                tail = torch.stack(history[-(W - 1):])  # (W - 1, C)
                history.append(conv_in)
                if not picked:  # conv_scope "sequence": the token moved the convolution only
                    continue
                weight = 1.0 if p == M else routing_weights[b, t, picks.index(p)].to(dtype)
                conv_out, _ = short_conv_step(conv_in[None], weights.conv, tail[None])
                q, k, v = conv_out[0].split([Kd, Kd, Vd])
                q = l2norm(q.view(H, K)) * K**-0.5
                k = l2norm(k.view(H, K))
                v = v.view(H, V)
                gates = proj[Kd + Vd:]
                if rule.uses_beta:
                    beta, gates = torch.sigmoid(gates[:H]), gates[H:]
                if rule.uses_gate:
                    rate = weights.A_log.to(dtype).exp()
                    S = S * torch.exp(-rate * F.softplus(gates[:H] + weights.dt_bias.to(dtype))).view(H, 1, 1)
                u = beta.view(H, 1) * (v - torch.einsum("hkv,hk->hv", S, k)) if rule.uses_beta else v
                S = S + torch.einsum("hk,hv->hkv", k, u)
                out[b, t] += weight * torch.einsum("hkv,hk->hv", S, q)
            new_memory[n, p] = S
            new_conv[n, p] = torch.stack(history[-(W - 1):])
    return out.reshape(B, T, H * V).to(x.dtype), new_memory, new_conv
