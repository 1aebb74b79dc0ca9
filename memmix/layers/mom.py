"""The Mixture-of-Memories layer (Du et al., arXiv 2502.13685).

A router sends each token to its top-k of M memories; an optional shared memory sees every token. Each
memory keeps its own recurrent state (gated delta rule by default) and runs a causal short convolution
over its own token sub-sequence. Outputs are mixed by the routing weights, the shared memory's output is
added, then an output-gated RMSNorm and the output projection.

The layer holds the weights and makes the router call, one call of the mixer op (memmix.ops.mom.mom_mixer: the
dispatch, every memory's convolution and recurrence, the mix; docs/design.md) and the output gate, norm and
projection.

Ablation options (defaults: the paper): router_temperature (the routing softmax over logits / temperature),
router_input (route from the token or from a causal short convolution of the layer input), conv_scope (each memory's
convolution over its own tokens or over the whole sequence).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from memmix.checks import is_int
from memmix.layers.gates import decay_parameters, init_decay_parameters
from memmix.layers.masks import check_hidden_states, valid_tokens
from memmix.layers.norms import GatedRMSNorm, RMSNorm
from memmix.ops.dtypes import compute_dtype
from memmix.ops.mom import CONV_SCOPES, MIXER_IMPLS, MoMWeights, mom_mixer, sequence_conv
from memmix.ops.registry import get_rule, rules
from memmix.routing import allowed_memories, route

MEMORY_RULES = tuple(rule.alias for rule in rules())  # ("gated_delta", "delta", "gla", "linear")
ROUTER_INPUTS = ("token", "conv")


@dataclass(frozen=True)
class MoMOptions:
    """The MoM layer's options, checked in one place (check). MoMConfig stores the same fields (with defaults of
    its own for head_dim and norm_eps) and MixtureOfMemories.from_config reads them back by name: a new option is a
    field here and an argument of MoMConfig.

    memory_groups: group sizes (summing to num_memories) or None; the other fields: see MixtureOfMemories.
    """

    num_heads: int = 4
    head_dim: int = 64
    expand_v: float = 1.0
    num_memories: int = 4
    topk: int = 2
    shared_mem: bool = True
    single_kv_proj: bool = False
    memory_rule: str = "gated_delta"
    use_output_gate: bool = True
    conv_size: int = 4
    norm_eps: float = 1e-5
    impl: str = "auto"
    memory_groups: tuple[int, ...] | list[int] | None = None
    low_memory: bool = False
    router_temperature: float = 1.0
    router_input: str = "token"
    conv_scope: str = "segment"

    def check(self, hidden_size: int) -> None:
        """ValueError naming the first bad option (or hidden_size) and what it may be: the one check of every
        option, for the layer and for MoMConfig."""
        check_mom_args(hidden_size, self.num_heads, self.head_dim, self.expand_v, self.num_memories, self.topk,
                       self.memory_rule, self.conv_size)
        for name in ("shared_mem", "single_kv_proj", "use_output_gate", "low_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.impl not in MIXER_IMPLS:
            raise ValueError(f"impl must be one of {list(MIXER_IMPLS)}, got {self.impl!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a number > 0, got {self.norm_eps!r}")
        check_memory_groups(self.memory_groups, self.num_memories, self.topk)
        _check_ablation_args(self.router_temperature, self.router_input, self.conv_scope)


@dataclass
class MoMState:
    """Recurrent state of one MoM layer for N sequences.

    memory: (N, M + S, H, K, V) float32: the M routed memories, then the shared one (S = 1 if shared).
    conv:   (N, M + S, conv_size - 1, 2 * key_dim + value_dim): the last inputs of the q, k, v convolutions
            over each memory's own sub-sequence (conv_scope "sequence": over the sequence's last tokens).
    router_conv: (N, conv_size - 1, hidden_size): the last inputs of the router's convolution (router_input
            "conv"), or None.
    """

    memory: torch.Tensor
    conv: torch.Tensor
    num_routed: int
    router_conv: torch.Tensor | None = None

    @property
    def memory_states(self) -> torch.Tensor:
        """(N, M, H, K, V) routed memories."""
        return self.memory[:, : self.num_routed]

    @property
    def shared_state(self) -> torch.Tensor | None:
        """(N, H, K, V) shared memory, or None without one."""
        return self.memory[:, self.num_routed] if self.memory.shape[1] > self.num_routed else None

    def select(self, index: torch.Tensor) -> MoMState:
        """Keep/reorder sequences: index (N',) int64."""
        router_conv = None if self.router_conv is None else self.router_conv.index_select(0, index)
        return MoMState(self.memory.index_select(0, index), self.conv.index_select(0, index), self.num_routed,
                        router_conv)

    def clone(self) -> MoMState:
        """A copy with contiguous tensors of its own."""
        router_conv = None if self.router_conv is None else self.router_conv.clone().contiguous()
        return MoMState(self.memory.clone().contiguous(), self.conv.clone().contiguous(), self.num_routed, router_conv)

    def copy_(self, other: MoMState) -> MoMState:
        """Write other's values into this state's tensors (same shapes); returns self."""
        self.memory.copy_(other.memory)
        self.conv.copy_(other.conv)
        if self.router_conv is not None:
            self.router_conv.copy_(other.router_conv)
        return self


@dataclass
class MoMLayerOutput:
    hidden_states: torch.Tensor  # (B, T, D)
    router_logits: torch.Tensor  # (B, T, M) float32: the routing softmax's input, gate logits / router_temperature
    state: MoMState | None


class MixtureOfMemories(nn.Module):
    """MoM token mixer. Input and output (B, T, hidden_size).

    Stacked per-memory projections hold P rows: the M routed memories then the shared one, or a single
    row used by every memory when single_kv_proj.

    low_memory: trade time for training memory on the Triton path. The convolution keeps x and the weights
    instead of the every-memory k/v projection and rebuilds it in its backward one feature group at a time, and
    the recurrence runs one head at a time, forward and backward (passed to mom_mixer and down to the kernels).
    impl: the mixer op's path, see memmix.ops.mom.mixer (MIXER_IMPLS).

    router_temperature (> 0): the routing softmax runs over gate(x) / router_temperature (memmix.routing.route).
    router_input: "token" routes from the layer input x; "conv" from silu(causal depthwise conv(x)) with conv_size
    taps of its own (router_conv1d) along each sequence's real tokens, continuing from the state's router_conv tail.
    conv_scope: "segment" (each memory convolves its own tokens, the paper) or "sequence" (every memory's projections
    convolved along the whole sequence before the dispatch; the mixer's PyTorch path; memmix.ops.mom.mixer).
    """

    def __init__(self, hidden_size: int, *, layer_idx: int | None = None, options: MoMOptions | None = None,
                 **option_values):
        """options, or MoMOptions' fields as keyword arguments (defaults: MoMOptions')."""
        super().__init__()
        if options is None:
            options = MoMOptions(**option_values)
        elif option_values:
            raise TypeError(f"give options or its fields as keyword arguments, not both (got {sorted(option_values)})")
        options.check(hidden_size)
        self.options = options
        num_heads, head_dim, num_memories, shared_mem = (options.num_heads, options.head_dim, options.num_memories,
                                                         options.shared_mem)
        conv_size, use_output_gate, norm_eps = options.conv_size, options.use_output_gate, options.norm_eps
        self.memory_groups = None if options.memory_groups is None else [int(n) for n in options.memory_groups]
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_k_dim = head_dim
        self.head_v_dim = int(head_dim * options.expand_v)
        self.key_dim = num_heads * head_dim
        self.value_dim = num_heads * self.head_v_dim
        self.num_memories = num_memories
        self.topk = options.topk
        self.shared_mem = shared_mem
        self.single_kv_proj = options.single_kv_proj
        self.memory_rule = options.memory_rule
        self.use_output_gate = use_output_gate
        self.conv_size = conv_size
        self.impl = options.impl
        self.low_memory = options.low_memory
        self.router_temperature = float(options.router_temperature)
        self.router_input = options.router_input
        self.conv_scope = options.conv_scope
        self.layer_idx = layer_idx
        self.num_slots_memories = num_memories + int(shared_mem)  # M + S
        # decode steps write the picked memories back into the given state's tensors (CUDA-graph decoding)
        self.inplace_decode = False
        rows = 1 if self.single_kv_proj else self.num_slots_memories  # P

        self.gate = nn.Linear(hidden_size, num_memories, bias=False)
        self.router_conv1d = _depthwise_conv(hidden_size, conv_size) if self.router_input == "conv" else None
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Parameter(torch.empty(rows, self.key_dim, hidden_size))
        self.v_proj = nn.Parameter(torch.empty(rows, self.value_dim, hidden_size))
        rule = get_rule(self.memory_rule)
        self.b_proj = nn.Parameter(torch.empty(rows, num_heads, hidden_size)) if rule.uses_beta else None
        self.a_proj = nn.Parameter(torch.empty(rows, num_heads, hidden_size)) if rule.uses_gate else None
        self.A_log, self.dt_bias = decay_parameters(num_heads)
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

    @classmethod
    def from_config(cls, config, layer_idx: int | None = None) -> MixtureOfMemories:
        """The MoM layer of a MoMConfig: every MoMOptions field read from the config by name (memory_groups as
        its list of group sizes)."""
        values = {f.name: getattr(config, f.name) for f in fields(MoMOptions)}
        values["memory_groups"] = config.memory_group_sizes
        return cls(config.hidden_size, layer_idx=layer_idx, options=MoMOptions(**values))

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
        init_decay_parameters(self.A_log, self.dt_bias)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d, self.router_conv1d):
            if conv is not None:
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
        router_conv = None
        if self.router_input == "conv":
            router_conv = torch.zeros(batch_size, self.conv_size - 1, self.hidden_size, device=device, dtype=dtype)
        return MoMState(memory, conv, self.num_memories, router_conv)

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
        check_hidden_states(hidden_states, self.hidden_size)
        B, T, _ = hidden_states.shape
        valid = valid_tokens(hidden_states, attention_mask, cu_seqlens)
        router_in, router_tail = self._router_input(hidden_states, valid, cu_seqlens, state)
        allowed = self._allowed(modality_ids, B, T, hidden_states.device)
        decision = route(self.gate(router_in), self.topk, allowed, self.router_temperature)
        mixed = mom_mixer(
            hidden_states, decision.indices, decision.weights, self._weights(), rule=self.memory_rule,
            num_heads=self.num_heads, num_memories=self.num_memories, shared_memory=self.shared_mem,
            memory=None if state is None else state.memory, conv=None if state is None else state.conv, valid=valid,
            cu_seqlens=cu_seqlens, use_cache=use_cache, low_memory=self.low_memory, inplace=self.inplace_decode,
            impl=self.impl, conv_scope=self.conv_scope,
        )
        o = self._output(hidden_states, mixed.o)
        new_state = None
        if use_cache:
            written = state is not None and mixed.memory is state.memory and mixed.conv is state.conv
            if written and router_tail is not None:  # an in-place decoding step writes the router's tail too
                state.router_conv.copy_(router_tail)
            new_state = state if written else MoMState(mixed.memory, mixed.conv, self.num_memories, router_tail)
        return MoMLayerOutput(o, decision.logits, new_state)

    def _router_input(self, x: torch.Tensor, valid: torch.Tensor, cu_seqlens, state: MoMState | None):
        """What the router reads, (B, T, D), and the router convolution's new tail (N, W-1, D) or None: x itself
        (router_input "token"), or silu(causal depthwise conv(x)) along each sequence's real tokens ("conv")."""
        if self.router_input == "token":
            return x, None
        tail = None if state is None else state.router_conv
        if state is not None and tail is None:
            raise ValueError("state has no router_conv tail, which router_input='conv' needs (a state made by a "
                             "layer with router_input='token'?)")
        y, new_tail = sequence_conv(x, self.router_conv1d.weight[:, 0], valid, cu_seqlens, tail)  # weight (D, W)
        dtype = compute_dtype(x.dtype) if tail is None else tail.dtype  # as the mixer's tails
        return y, new_tail.to(dtype)

    def _weights(self) -> MoMWeights:
        """The mixer's weights: the stacked per-memory k, v, beta, decay projections (P, Kd + Vd + gates, D) and the
        q | k | v depthwise conv weights (2 Kd + Vd, W), made from the parameters for this call."""
        stacked = [self.k_proj, self.v_proj] + [w for w in (self.b_proj, self.a_proj) if w is not None]
        conv = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]
        return MoMWeights(self.q_proj.weight, torch.cat(stacked, dim=1), conv, self.A_log, self.dt_bias)

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


def _depthwise_conv(channels: int, kernel_size: int) -> nn.Conv1d:
    """Weight holder (channels, 1, kernel_size) for a causal depthwise convolution (applied functionally)."""
    return nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=False)


def check_mom_args(hidden_size, num_heads, head_dim, expand_v, num_memories, topk, memory_rule, conv_size) -> None:
    """ValueError naming the first bad MixtureOfMemories argument and what it may be (MoMConfig calls it too)."""
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim),
                        ("num_memories", num_memories)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 1 <= topk <= num_memories:
        raise ValueError(f"topk must be in [1, num_memories={num_memories}], got {topk!r}")
    if memory_rule not in MEMORY_RULES:
        raise ValueError(f"memory_rule must be one of {MEMORY_RULES}, got {memory_rule!r}")
    if not is_int(conv_size) or conv_size < 2:
        raise ValueError(f"conv_size must be an integer >= 2, got {conv_size!r}")
    if expand_v <= 0 or head_dim * expand_v != int(head_dim * expand_v):
        raise ValueError(f"expand_v must be positive with head_dim * expand_v an integer, got {expand_v!r}")


def _check_ablation_args(router_temperature, router_input, conv_scope) -> None:
    if isinstance(router_temperature, bool) or not isinstance(router_temperature, (int, float)) \
            or not router_temperature > 0:
        raise ValueError(f"router_temperature must be a number > 0, got {router_temperature!r}")
    if router_input not in ROUTER_INPUTS:
        raise ValueError(f"router_input must be one of {list(ROUTER_INPUTS)}, got {router_input!r}")
    if conv_scope not in CONV_SCOPES:
        raise ValueError(f"conv_scope must be one of {list(CONV_SCOPES)}, got {conv_scope!r}")


def check_memory_groups(memory_groups, num_memories: int, topk: int) -> None:
    """ValueError unless memory_groups (None or group sizes) split num_memories with topk <= the smallest group."""
    if memory_groups is None:
        return
    sizes = list(memory_groups)
    if not sizes or any(not is_int(n) or n < 1 for n in sizes) or sum(sizes) != num_memories:
        raise ValueError(
            f"memory_groups must be positive group sizes summing to num_memories={num_memories}, got {memory_groups!r}"
        )
    if topk > min(sizes):
        raise ValueError(f"topk must be <= the smallest memory group ({min(sizes)}) with memory_groups, got {topk}")
