"""The Mixture-of-Memories layer (Du et al., arXiv 2502.13685).

A router sends each token to its top-k of M memories; an optional shared memory sees every token. Each
memory keeps its own recurrent state (gated delta rule by default) and runs a causal short convolution
over its own token sub-sequence. Outputs are mixed by the routing weights, the shared memory's output is
added, then an output-gated RMSNorm and the output projection.

The shared memory is handled as memory number M with weight 1 on every token, so one dispatch, one
convolution and one recurrence call serve all M + 1 memories (no per-memory Python loop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memmix import ops
from memmix.ops import triton as triton_ops
from memmix.ops.segments import FeatureGroups, segment_combine, segment_conv
from memmix.layers.masks import valid_tokens
from memmix.layers.norms import GatedRMSNorm, RMSNorm
from memmix.ops.registry import get_rule, rules
from memmix.routing import DispatchPlan, allowed_memories, plan_dispatch, route

MEMORY_RULES = tuple(rule.alias for rule in rules())  # ("gated_delta", "delta", "gla", "linear")
# inputs up to this length use the dense layout (decoding steps, short prompts)
DENSE_LAYOUT_MAX_LEN = 16


@dataclass
class MoMState:
    """Recurrent state of one MoM layer for N sequences.

    memory: (N, M + S, H, K, V) float32: the M routed memories, then the shared one (S = 1 if shared).
    conv:   (N, M + S, conv_size - 1, 2 * key_dim + value_dim): the last inputs of the q, k, v convolutions
            over each memory's own sub-sequence.
    """

    memory: torch.Tensor
    conv: torch.Tensor
    num_routed: int

    @property
    def memory_states(self) -> torch.Tensor:
        """(N, M, H, K, V) routed memories."""
        return self.memory[:, : self.num_routed]

    @property
    def shared_state(self) -> torch.Tensor | None:
        """(N, H, K, V) shared memory, or None without one."""
        return self.memory[:, self.num_routed] if self.memory.shape[1] > self.num_routed else None

    @property
    def conv_tails(self) -> torch.Tensor:
        return self.conv

    def select(self, index: torch.Tensor) -> MoMState:
        """Keep/reorder sequences: index (N',) int64."""
        return MoMState(self.memory.index_select(0, index), self.conv.index_select(0, index), self.num_routed)


@dataclass
class MoMLayerOutput:
    hidden_states: torch.Tensor  # (B, T, D)
    router_logits: torch.Tensor  # (B, T, M) float32
    state: MoMState | None


class MixtureOfMemories(nn.Module):
    """MoM token mixer. Input and output (B, T, hidden_size).

    Stacked per-memory projections hold P rows: the M routed memories then the shared one, or a single
    row used by every memory when single_kv_proj.

    low_memory: trade time for training memory on the Triton path. The convolution keeps x and the weights
    instead of the every-memory k/v projection and rebuilds it in its backward one feature group at a time, and
    the recurrence runs one head at a time, forward and backward (an argument of the rule op and its kernel).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        head_dim: int = 64,
        expand_v: float = 1.0,
        num_memories: int = 4,
        topk: int = 2,
        shared_mem: bool = True,
        single_kv_proj: bool = False,
        memory_rule: str = "gated_delta",
        use_output_gate: bool = True,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        layer_idx: int | None = None,
        memory_groups: list[int] | None = None,
        low_memory: bool = False,
    ):
        super().__init__()
        _check_args(hidden_size, num_heads, head_dim, expand_v, num_memories, topk, memory_rule, conv_size)
        _check_groups(memory_groups, num_memories, topk)
        if not isinstance(low_memory, bool):
            raise ValueError(f"low_memory must be True or False, got {low_memory!r}")
        self.memory_groups = None if memory_groups is None else [int(n) for n in memory_groups]
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_k_dim = head_dim
        self.head_v_dim = int(head_dim * expand_v)
        self.key_dim = num_heads * head_dim
        self.value_dim = num_heads * self.head_v_dim
        self.num_memories = num_memories
        self.topk = topk
        self.shared_mem = shared_mem
        self.single_kv_proj = single_kv_proj
        self.memory_rule = memory_rule
        self.use_output_gate = use_output_gate
        self.conv_size = conv_size
        self.impl = impl
        self.low_memory = low_memory
        self.layer_idx = layer_idx
        self.num_slots_memories = num_memories + int(shared_mem)  # M + S
        # decode steps write the picked memories back into the given state's tensors (CUDA-graph decoding)
        self.inplace_decode = False
        rows = 1 if single_kv_proj else self.num_slots_memories  # P

        self.gate = nn.Linear(hidden_size, num_memories, bias=False)
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Parameter(torch.empty(rows, self.key_dim, hidden_size))
        self.v_proj = nn.Parameter(torch.empty(rows, self.value_dim, hidden_size))
        rule = get_rule(memory_rule)
        self.b_proj = nn.Parameter(torch.empty(rows, num_heads, hidden_size)) if rule.uses_beta else None
        self.a_proj = nn.Parameter(torch.empty(rows, num_heads, hidden_size)) if rule.uses_gate else None
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.q_conv1d = _depthwise_conv(self.key_dim, conv_size)
        self.k_conv1d = _depthwise_conv(self.key_dim, conv_size)
        self.v_conv1d = _depthwise_conv(self.value_dim, conv_size)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the reference: small Xavier weights, decay rates A in (1, 16), dt in [1e-3, 0.1]."""
        gain = 2**-2.5
        for linear in (self.gate, self.q_proj, self.o_proj, getattr(self, "g_proj", None)):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight, gain=gain)
        for stacked in (self.k_proj, self.v_proj, self.b_proj, self.a_proj):
            if stacked is not None:
                for row in stacked.data:
                    nn.init.xavier_uniform_(row, gain=gain)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.o_norm.weight.data.fill_(1.0)

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> MoMState:
        """Zero state for batch_size sequences."""
        P = self.num_slots_memories
        memory = torch.zeros(batch_size, P, self.num_heads, self.head_k_dim, self.head_v_dim, device=device, dtype=dtype)
        conv = torch.zeros(batch_size, P, self.conv_size - 1, self.conv_channels, device=device, dtype=dtype)
        return MoMState(memory, conv, self.num_memories)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: MoMState | None = None,
        use_cache: bool = False,
        modality_ids: torch.Tensor | None = None,
    ) -> MoMLayerOutput:
        """hidden_states (B, T, D); attention_mask (B, T_total) 0/1, last T columns used; cu_seqlens
        (N + 1,) int64 for a packed batch (B == 1); state from an earlier call (see MoMState);
        modality_ids (B, T or T_total) int64 group of each token when memory_groups is set (default 0)."""
        B, T, _ = hidden_states.shape
        valid = valid_tokens(hidden_states, attention_mask, cu_seqlens)
        decision = route(self.gate(hidden_states), self.topk, self._allowed(modality_ids, B, T, hidden_states.device))
        memory_ids, slot_weights = self._slots(decision.indices, decision.weights)
        if T == 1 and cu_seqlens is None:
            return self._decode_step(hidden_states, valid, decision, memory_ids, slot_weights, state, use_cache)
        layout = "dense" if cu_seqlens is None and T <= DENSE_LAYOUT_MAX_LEN else "packed"
        plan = plan_dispatch(memory_ids, valid, self.num_slots_memories, cu_seqlens, layout)
        N = plan.num_sequences
        if state is not None and state.memory.shape[0] != N:
            raise ValueError(f"state holds {state.memory.shape[0]} sequences but the input has {N}")

        tails = None if state is None else state.conv.reshape(plan.num_segments, self.conv_size - 1, -1)
        initial = None if state is None else state.memory.reshape(plan.num_segments, *state.memory.shape[2:])
        if self._fused_dispatch(plan, hidden_states, tails):
            o, final, new_tails = self._memories_fused(hidden_states, memory_ids, slot_weights, valid, plan, tails,
                                                       initial, use_cache)
        else:
            o, final, new_tails = self._memories(hidden_states, memory_ids, slot_weights, plan, tails, initial,
                                                 use_cache)
        o = self._output(hidden_states, o)

        new_state = None
        if use_cache:
            P = self.num_slots_memories
            memory = final.reshape(N, P, *final.shape[1:])
            conv = new_tails.reshape(N, P, self.conv_size - 1, -1)
            new_state = MoMState(memory, conv.to(memory.dtype), self.num_memories)
        return MoMLayerOutput(o, decision.logits, new_state)

    def _fused_dispatch(self, plan: DispatchPlan, x: torch.Tensor, tails: torch.Tensor | None) -> bool:
        """Use the Triton segment kernels: packed layout, impl auto/triton, Triton on x's device, and no
        gradient wanted for the incoming conv tails (the PyTorch path differentiates those)."""
        return (plan.layout == "packed" and self.impl in ("auto", "triton") and triton_ops.is_available(x)
                and not (tails is not None and tails.requires_grad))

    def _memories(self, x, memory_ids, slot_weights, plan, tails, initial, use_cache):
        """PyTorch path: dispatch copies, one conv1d over the segment buffer, recurrence, combine.

        Returns the mixed outputs (B, T, Vd), the final states (R, H, K, V) or None, the new tails (R, W-1, C).
        """
        conv_in, gates_in = self._slot_projections(x, memory_ids)
        conv_out, new_tails = self._segment_conv(plan, plan.dispatch(conv_in), tails)
        q, k, v = conv_out.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        beta, g = self._gates(plan.dispatch(gates_in))
        if plan.layout == "dense":  # unused cells must leave the state unchanged
            filled = plan.filled_rows().unsqueeze(-1)
            k = k * filled
            beta = None if beta is None else beta * filled
            g = None if g is None else g * filled
        o, final = self._recurrence(plan, q, k, v, g, beta, initial, use_cache)
        return plan.combine(o.reshape(plan.buffer_len, -1), slot_weights), final, new_tails

    def _memories_fused(self, x, memory_ids, slot_weights, valid, plan, tails, initial, use_cache):
        """Triton path: q, k, v gathered and convolved straight from the projections (memmix.ops.segments),
        recurrence, fused weighted combine. Same returns as _memories."""
        B, T, D = x.shape
        rows = plan.segment_rows(memory_ids)
        q_src = self.q_proj(x).reshape(B * T, self.key_dim)
        x_flat, kv_weight = x.reshape(B * T, D), self._stacked_kv_weight().reshape(-1, D)
        if self.low_memory and torch.is_autocast_enabled(x.device.type):
            # the projection's inputs as autocast casts them: the convolution keeps these and rebuilds kv_src from
            # them exactly as the forward made it
            dtype = torch.get_autocast_dtype(x.device.type)
            x_flat, kv_weight = x_flat.to(dtype), kv_weight.to(dtype)
        # low_memory: the convolution keeps x and the weights, not the every-memory projection, and differentiates
        # them itself (rebuilding the projection one feature group at a time); the projection is then made without
        # a graph, unless the returned conv tails (use_cache) need one
        with torch.set_grad_enabled(torch.is_grad_enabled() and (use_cache or not self.low_memory)):
            kv_src = F.linear(x_flat, kv_weight).view(B * T, self.k_proj.shape[0], -1)
        groups = FeatureGroups(self.num_heads, self.head_k_dim, self.head_v_dim,
                               kv_src.shape[-1] - self.key_dim - self.value_dim, self.conv_size)
        kv_inputs = (x_flat, kv_weight) if self.low_memory else None
        q, k, v, gates = segment_conv(q_src, kv_src, self._conv_weight(), rows, groups,
                                      None if tails is None else tails.detach(), kv_inputs)
        new_tails = self._last_inputs(plan, rows, q_src, kv_src, tails) if use_cache else None
        del kv_src  # unless the convolution kept it, it is freed before the recurrence allocates its scratch
        beta, g = self._gates(gates)
        o, final = self._recurrence(plan, q, k, v, g, beta, initial, use_cache, normalized=True)
        weights = (slot_weights * valid.unsqueeze(-1)).reshape(B * T, -1)
        mixed = segment_combine(o.reshape(plan.buffer_len, -1), rows.slot_row, weights).view(B, T, -1)
        return mixed, final, new_tails

    def _last_inputs(self, plan, rows, q_src, kv_src, tails) -> torch.Tensor:
        """(R, W-1, C) the last W-1 conv inputs of every segment, reaching into the old tails when a segment
        is shorter than that."""
        W, R = self.conv_size, plan.num_segments
        position = plan.counts[:R].unsqueeze(1) + torch.arange(W - 1, device=q_src.device)  # in [tails; segment]
        row = (plan.starts[:R].unsqueeze(1) + position - (W - 1)).clamp(0, max(plan.buffer_len - 1, 0))
        tok, mem = rows.row_token[row].long(), rows.row_memory[row].long()
        if kv_src.shape[1] == 1:
            mem = torch.zeros_like(mem)
        inputs = torch.cat([q_src[tok], kv_src[tok, mem, : self.key_dim + self.value_dim]], dim=-1)
        if tails is None:
            tails = inputs.new_zeros(R, W - 1, inputs.shape[-1])
        old = tails.to(inputs.dtype).gather(1, position.clamp(max=W - 2).unsqueeze(-1).expand_as(inputs))
        return torch.where((position >= W - 1).unsqueeze(-1), inputs, old)

    def _decode_step(self, x, valid, decision, memory_ids, slot_weights, state, use_cache) -> MoMLayerOutput:
        """One token per sequence: step the picked memories' states and conv tails; the others are not touched.

        x (B, 1, D); valid (B, 1); memory_ids, slot_weights (B, 1, S).
        """
        B, _, S = memory_ids.shape
        P, W, H = self.num_slots_memories, self.conv_size, self.num_heads
        if state is None:
            state = self.init_state(B, x.device, torch.promote_types(x.dtype, torch.float32))
        elif state.memory.shape[0] != B:
            raise ValueError(f"state holds {state.memory.shape[0]} sequences but the input has {B}")
        conv_in, gates_in = self._slot_projections(x, memory_ids)
        picked = (torch.arange(B, device=x.device).unsqueeze(1) * P + memory_ids[:, 0]).reshape(-1)  # (B*S,)
        tails = state.conv.reshape(B * P, W - 1, -1).index_select(0, picked)  # (B*S, W-1, C)
        window = torch.cat([tails.to(conv_in.dtype), conv_in.reshape(B * S, 1, -1)], dim=1)  # (B*S, W, C)
        weight = self._conv_weight()  # (C, W)
        conv_out = F.silu((window * weight.t().to(window.dtype)).sum(1))  # (B*S, C)
        q, k, v = (t.reshape(B * S, H, -1) for t in conv_out.split([self.key_dim, self.key_dim, self.value_dim], -1))
        beta, g = self._gates(gates_in.reshape(B * S, -1))
        keep = valid.reshape(B, 1).expand(B, S).reshape(-1)
        o, memory = self._step_memories(q, k, v, g, beta, state.memory, picked, keep, use_cache)
        o = o.reshape(B, 1, S, self.value_dim) * (slot_weights * valid.unsqueeze(-1)).unsqueeze(-1).to(o.dtype)
        o = self._output(x, o.sum(2))
        new_state = None
        if use_cache:
            new_tails = torch.where(keep.view(-1, 1, 1), window[:, 1:].to(state.conv.dtype), tails)
            conv = state.conv.reshape(B * P, W - 1, -1)
            if self.inplace_decode:
                conv.index_copy_(0, picked, new_tails)
                new_state = state
            else:
                new_state = MoMState(memory, conv.index_copy(0, picked, new_tails).view_as(state.conv),
                                     self.num_memories)
        return MoMLayerOutput(o, decision.logits, new_state)

    def _step_memories(self, q, k, v, g, beta, memory, picked, keep, use_cache):
        """One recurrent step of the picked states of memory (N, P, H, K, V), flat rows `picked` (B*S,).

        q, k (B*S, H, K); v (B*S, H, V); g, beta (B*S, H) or None; keep (B*S,) bool: pads change nothing.
        Returns o (B*S, H, V) and the new memory: `memory` itself when inplace_decode, a new tensor otherwise
        (the caller's is not modified), None without use_cache. The states are stepped in their bank by
        ops.memory_step: on Triton without a gradient to track (one read and one write of each picked state),
        else by its differentiable gather / step / scatter.
        """
        if not use_cache:
            before = memory.reshape(-1, *memory.shape[2:]).index_select(0, picked)  # (B*S, H, K, V)
            args = [t.unsqueeze(1) for t in (q, k, v, g, beta) if t is not None]  # (B*S, 1, H, ...)
            o, _ = get_rule(self.memory_rule).op(*args, initial_state=before, use_qk_l2norm=True, impl="recurrent")
            return o[:, 0], None
        if not self.inplace_decode:
            memory = memory.clone(memory_format=torch.contiguous_format)
        impl = "auto" if self.impl in ("auto", "triton") else "recurrent"
        o = ops.memory_step(self.memory_rule, q, k, v, g, beta, memory.view(-1, *memory.shape[2:]),
                            picked, keep, impl=impl)
        return o, memory

    def _allowed(self, modality_ids, B: int, T: int, device) -> torch.Tensor | None:
        """(B, T, M) bool memories open to each token under modality groups, or None without groups."""
        if self.memory_groups is None:
            if modality_ids is not None:
                raise ValueError("modality_ids needs memory_groups in the layer/config; got memory_groups=None")
            return None
        if modality_ids is None:
            modality_ids = torch.zeros(B, T, dtype=torch.long, device=device)
        if modality_ids.dim() != 2 or modality_ids.shape[0] != B or modality_ids.shape[1] < T:
            raise ValueError(f"modality_ids must be (batch, >= seq_len) = ({B}, >= {T}), got {tuple(modality_ids.shape)}")
        return allowed_memories(modality_ids[:, -T:].long(), self.memory_groups)

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Mixed memory outputs (B, T, Vd) -> output-gated RMSNorm per head -> o_proj: (B, T, D)."""
        B, T, _ = x.shape
        o = o.view(B, T, self.num_heads, self.head_v_dim)
        if self.use_output_gate:
            o = self.o_norm(o, self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, self.value_dim))

    def _slots(self, indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the shared memory (id M, weight 1) to every token's top-k picks: (B, T, S) each."""
        if not self.shared_mem:
            return indices, weights
        shared = torch.full_like(indices[..., :1], self.num_memories)
        return torch.cat([indices, shared], -1), torch.cat([weights, torch.ones_like(weights[..., :1])], -1)

    def _slot_projections(self, x: torch.Tensor, memory_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slot's convolution inputs (q, k, v) and gate inputs (b, a) from its memory's projections.

        x (B, T, D), memory_ids (B, T, S) -> (B, T, S, 2 Kd + Vd), (B, T, S, n_gates * H).
        One wide product over all memories' weights, then a gather of each slot's memory.
        """
        B, T, S = memory_ids.shape
        rows = self.k_proj.shape[0]
        wide = self._stacked_kv_weight()  # (P, C, D)
        proj = F.linear(x, wide.reshape(-1, wide.shape[-1])).view(B, T, rows, -1)  # (B, T, P, C)
        if rows == 1:
            proj = proj.expand(B, T, S, proj.shape[-1])
        else:
            proj = proj.gather(2, memory_ids.unsqueeze(-1).expand(B, T, S, proj.shape[-1]))
        kv, gates = proj.split([self.key_dim + self.value_dim, proj.shape[-1] - self.key_dim - self.value_dim], -1)
        q = self.q_proj(x).unsqueeze(2).expand(B, T, S, self.key_dim)
        return torch.cat([q, kv], dim=-1), gates

    def _stacked_kv_weight(self) -> torch.Tensor:
        """(P, Kd + Vd + n_gates * H, D): every memory's k, v, beta, decay projections, one row per memory."""
        weights = [self.k_proj, self.v_proj] + [w for w in (self.b_proj, self.a_proj) if w is not None]
        return torch.cat(weights, dim=1)

    def _conv_weight(self) -> torch.Tensor:
        """(2 Kd + Vd, W) depthwise conv weights of q, k, v."""
        return torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]

    def _segment_conv(
        self, plan: DispatchPlan, x: torch.Tensor, tails: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU over every segment, continuing from its tail.

        x (buffer_len, C) grouped by segment; tails (R, W-1, C) or None.
        Returns the outputs (buffer_len, C) and the new tails (R, W-1, C).
        Each segment gets W-1 rows in front of it holding its tail, so one convolution over the whole
        buffer never mixes segments.
        """
        W = self.conv_size
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
        weight = self._conv_weight().unsqueeze(1).to(ext.dtype)  # (C, 1, W)
        y = F.conv1d(ext.t().unsqueeze(0), weight, padding=W - 1, groups=C)[0, :, :ext_len].t()
        out = F.silu(y.index_select(0, shifted))
        new_tails = ext.index_select(0, (tail_rows + plan.counts.unsqueeze(1)).reshape(-1)).view(R, W - 1, C)
        return out, new_tails

    def _gates(self, gates: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(buffer_len, n_gates * H) -> beta (sigmoid) and log decay g = -exp(A_log) softplus(a + dt_bias)."""
        H = self.num_heads
        beta = g = None
        if self.b_proj is not None:
            beta, gates = gates[:, :H].sigmoid(), gates[:, H:]
        if self.a_proj is not None:
            a = gates[:, :H]
            dtype = torch.promote_types(a.dtype, torch.float32)
            g = -self.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + self.dt_bias.to(dtype))
        return beta, g

    def _recurrence(self, plan: DispatchPlan, q, k, v, g, beta, initial, use_cache: bool, normalized=False):
        """Run the memory rule over every segment in one call (normalized: q, k already L2-normalised).
        Returns o (buffer_len, H, V), final (R, H, K, V)."""
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        if plan.layout == "dense":
            shape, L = (plan.num_segments, plan.row_len), plan.num_segments * plan.row_len
            cu = None
        else:
            shape, L = (1, plan.buffer_len), plan.buffer_len
            cu = plan.cu_seqlens
            if initial is not None or use_cache:
                initial = _with_trash_state(initial, plan.num_segments, H, K, V, q)
        # a slice only when rows are left out: the backward of even a full-length slice copies the gradient
        args = [(t if t.shape[0] == L else t[:L]).reshape(*shape, H, -1) for t in (q, k, v)]
        extra = [(t if t.shape[0] == L else t[:L]).reshape(*shape, H) for t in (g, beta) if t is not None]
        kwargs = dict(
            initial_state=initial, output_final_state=use_cache, cu_seqlens=cu, use_qk_l2norm=not normalized,
            low_memory=self.low_memory, impl=self.impl
        )
        o, final = get_rule(self.memory_rule).op(*args, *extra, **kwargs)
        o = o.reshape(L, H, V)
        if plan.layout == "dense":
            o = torch.cat([o, o.new_zeros(plan.buffer_len - L, H, V)])
        elif final is not None:
            final = final[: plan.num_segments]
        return o, final


def _with_trash_state(initial, R: int, H: int, K: int, V: int, like: torch.Tensor) -> torch.Tensor:
    """Append a zero state for the packed layout's trash segment: (R, H, K, V) -> (R + 1, H, K, V)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    if initial is None:
        return torch.zeros(R + 1, H, K, V, dtype=dtype, device=like.device)
    return torch.cat([initial, initial.new_zeros(1, H, K, V)])


def _depthwise_conv(channels: int, kernel_size: int) -> nn.Conv1d:
    """Weight holder (channels, 1, kernel_size) for a causal depthwise convolution (applied functionally)."""
    return nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=False)


def _check_args(hidden_size, num_heads, head_dim, expand_v, num_memories, topk, memory_rule, conv_size) -> None:
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim),
                        ("num_memories", num_memories)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 1 <= topk <= num_memories:
        raise ValueError(f"topk must be in [1, num_memories={num_memories}], got {topk!r}")
    if memory_rule not in MEMORY_RULES:
        raise ValueError(f"memory_rule must be one of {MEMORY_RULES}, got {memory_rule!r}")
    if not isinstance(conv_size, int) or conv_size < 2:
        raise ValueError(f"conv_size must be an integer >= 2, got {conv_size!r}")
    if expand_v <= 0 or head_dim * expand_v != int(head_dim * expand_v):
        raise ValueError(f"expand_v must be positive with head_dim * expand_v an integer, got {expand_v!r}")


def _check_groups(memory_groups, num_memories: int, topk: int) -> None:
    if memory_groups is None:
        return
    sizes = list(memory_groups)
    if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes) or sum(sizes) != num_memories:
        raise ValueError(
            f"memory_groups must be positive group sizes summing to num_memories={num_memories}, got {memory_groups!r}"
        )
    if topk > min(sizes):
        raise ValueError(f"topk must be <= the smallest memory group ({min(sizes)}) with memory_groups, got {topk}")
