"""What every path of the MoM mixer shares: its weights and sizes, the slot projections, the gates, and the
recurrence over the segments of a dispatch plan."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from memmix.ops.common import log_decay, run_checked
from memmix.ops.dtypes import compute_dtype
from memmix.ops.mom.plan import DispatchPlan
from memmix.ops.registry import MemoryRule


@dataclass
class MoMWeights:
    """The mixer's learned tensors (what the MoM layer holds), in the layout the op reads.

    q_proj:  (Kd, D) the query projection, shared by every memory (Kd = H * K).
    kv_proj: (P', Kd + Vd + G, D) each memory's k | v | gate rows (Vd = H * V; G = H per gate the rule takes:
             beta first, then the decay's a), for P' = P memories (routed then shared) or P' = 1 (one row that
             every memory uses).
    conv:    (2 Kd + Vd, W) depthwise causal convolution weights of q | k | v, oldest tap first.
    A_log, dt_bias: (H,) the decay's log rate and bias (g = -exp(A_log) softplus(a + dt_bias)); None for rules
             without decay.
    """

    q_proj: torch.Tensor
    kv_proj: torch.Tensor
    conv: torch.Tensor
    A_log: Optional[torch.Tensor] = None
    dt_bias: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class MixerSizes:
    """The sizes every path reads: the rule, H heads of K (q/k) and V (v) features, M routed memories (+ one
    shared), the convolution width W."""

    rule: MemoryRule
    num_heads: int
    head_k_dim: int
    head_v_dim: int
    num_memories: int
    shared_memory: bool
    conv_size: int

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @property
    def num_slot_memories(self) -> int:
        """P = M + 1 with a shared memory, else M: the memories a slot may name."""
        return self.num_memories + int(self.shared_memory)


def slot_projections(x: torch.Tensor, memory_ids: torch.Tensor, weights: MoMWeights,
                     sizes: MixerSizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's convolution inputs (q, k, v) and gate inputs from its memory's projections.

    x (B, T, D), memory_ids (B, T, S) -> (B, T, S, 2 Kd + Vd), (B, T, S, G).
    One wide product over all memories' weights, then a gather of each slot's memory.
    """
    B, T, S = memory_ids.shape
    Kd, Vd = sizes.key_dim, sizes.value_dim
    wide = weights.kv_proj  # (P', F, D)
    rows = wide.shape[0]
    proj = F.linear(x, wide.reshape(-1, wide.shape[-1])).view(B, T, rows, -1)  # (B, T, P', F)
    if rows == 1:
        proj = proj.expand(B, T, S, proj.shape[-1])
    else:
        proj = proj.gather(2, memory_ids.unsqueeze(-1).expand(B, T, S, proj.shape[-1]))
    kv, gates = proj.split([Kd + Vd, proj.shape[-1] - Kd - Vd], -1)
    q = F.linear(x, weights.q_proj).unsqueeze(2).expand(B, T, S, Kd)
    return torch.cat([q, kv], dim=-1), gates


def memory_conv_inputs(x: torch.Tensor, memory_ids: torch.Tensor, weights: MoMWeights,
                       sizes: MixerSizes) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_scope "sequence": every memory's convolution inputs (q, k, v) at every token, and each slot's gate inputs.

    x (B, T, D), memory_ids (B, T, S) -> (B, T, P, 2 Kd + Vd), (B, T, S, G); P = sizes.num_slot_memories.
    """
    B, T, S = memory_ids.shape
    Kd, Vd, P = sizes.key_dim, sizes.value_dim, sizes.num_slot_memories
    wide = weights.kv_proj  # (P', F, D)
    rows = wide.shape[0]
    proj = F.linear(x, wide.reshape(-1, wide.shape[-1])).view(B, T, rows, -1)  # (B, T, P', F)
    kv, gates = proj.split([Kd + Vd, proj.shape[-1] - Kd - Vd], -1)
    q = F.linear(x, weights.q_proj).unsqueeze(2).expand(B, T, P, Kd)
    conv_in = torch.cat([q, kv.expand(B, T, P, Kd + Vd)], dim=-1)
    if rows == 1:
        gates = gates.expand(B, T, S, gates.shape[-1])
    else:
        gates = gates.gather(2, memory_ids.unsqueeze(-1).expand(B, T, S, gates.shape[-1]))
    return conv_in, gates


def memory_gates(gates: torch.Tensor, weights: MoMWeights,
                 sizes: MixerSizes) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(rows, G) gate features -> beta = sigmoid(b) and log decay g = -exp(A_log) softplus(a + dt_bias), each
    (rows, H) or None where the rule takes no such gate."""
    H = sizes.num_heads
    beta = g = None
    if sizes.rule.uses_beta:
        beta, gates = gates[:, :H].sigmoid(), gates[:, H:]
    if sizes.rule.uses_gate:
        g = log_decay(gates[:, :H], weights.A_log, weights.dt_bias)
    return beta, g


def run_recurrence(plan: DispatchPlan, q, k, v, g, beta, initial, sizes: MixerSizes, *, use_cache: bool,
                   normalized: bool, low_memory: bool, impl: str):
    """Run the memory rule over every segment of the buffer in one call.

    q, k (rows, Kd), v (rows, Vd), g, beta (rows, H) or None, rows >= the plan's cells; initial (R, H, K, V) or
    None; normalized: q and k are L2-normalised already (else the rule does it). Returns o (buffer_len, H, V) and
    the final states (R, H, K, V) (None without use_cache).
    """
    H, K, V = sizes.num_heads, sizes.head_k_dim, sizes.head_v_dim
    if plan.layout == "dense":
        shape, L = (plan.num_segments, plan.row_len), plan.num_segments * plan.row_len
        cu = None
    else:
        shape, L = (1, plan.buffer_len), plan.buffer_len
        cu = plan.cu_seqlens
        if initial is not None or use_cache:
            initial = with_trash_state(initial, plan.num_segments, H, K, V, q)
    # a slice only when rows are left out: the backward of even a full-length slice copies the gradient
    args = [(t if t.shape[0] == L else t[:L]).reshape(*shape, H, -1) for t in (q, k, v)]
    g, beta = ((t if t.shape[0] == L else t[:L]).reshape(*shape, H) if t is not None else None for t in (g, beta))
    # the mixer checked its inputs once: the rule runs unchecked (memmix.ops.common.run_checked)
    o, final = run_checked(sizes.rule, *args, g, beta, initial_state=initial, output_final_state=use_cache,
                           cu_seqlens=cu, use_qk_l2norm=not normalized, low_memory=low_memory, impl=impl)
    o = o.reshape(L, H, V)
    if plan.layout == "dense":
        o = torch.cat([o, o.new_zeros(plan.buffer_len - L, H, V)])
    elif final is not None:
        final = final[: plan.num_segments]
    return o, final


def with_trash_state(initial, R: int, H: int, K: int, V: int, like: torch.Tensor) -> torch.Tensor:
    """Append a zero state for the packed layout's trash segment: (R, H, K, V) -> (R + 1, H, K, V)."""
    dtype = compute_dtype(like.dtype)
    if initial is None:
        return torch.zeros(R + 1, H, K, V, dtype=dtype, device=like.device)
    return torch.cat([initial, initial.new_zeros(1, H, K, V)])
