"""The B'MOJO-F layer: the B'MOJO construction of the authors' released code (awslabs/hybrid-model-factory).

A fading mixer (a gated-delta-rule block by default; any memmix memory rule) reads the layer input x and writes
*fading tokens* f = mixer(x) (B, T, D). One softmax attention then takes queries from x and keys/values from two
sources, normalised together (so the effective window is 2w):

- in-context: keys/values of x at positions [i - w + 1, i] (a sliding window of w tokens, the token included);
- fading: keys/values of f at positions [i - 2w + 1, i - w] (the w tokens just before that window).

Positions count real tokens of one sequence (padding skipped, each packed document from 0). Rotary embeddings
rotate queries at their own position and every key, in-context or fading, at the position of the token it came
from, so a fading key is always w..2w-1 positions behind its query. tie_attn_weights=True (default): both paths
use q_proj / k_proj / v_proj (and q_norm / k_norm); False: the fading path has its own fading_q_proj,
fading_k_proj, fading_v_proj (and norms), its logits being fading_q(x) . fading_k(f).

Training / prefill (no incoming state): the rows of real tokens are compacted (padding and packed documents ->
one row per sequence), the mixer runs over them with one call of its memory rule, and attention runs either as
one SDPA with a (L, 2L) mask (short rows) or blocked: each block of queries against the in-context and fading
keys it can reach, memory O(L (block + w)), one batched SDPA over all blocks. Decoding (an incoming
state) steps one token at a time; BMojoFState keeps the mixer's state and conv tails, the last w in-context
keys/values and the last 2w fading keys/values (fading keys enter the band w steps after they are made).

bmojo_f_reference is the same layer written naively (one sequence at a time, full attention over
[x-keys; f-keys] with the two band masks); the tests compare every path with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memmix.checks import is_int
from memmix.ops.common import log_decay
from memmix.ops.dtypes import compute_dtype
from memmix.ops.registry import get_rule, rules
from memmix.ops.short_conv import row_tails, short_conv, short_conv_step
from memmix.layers.attention import apply_rope
from memmix.layers.gates import head_gate_projections, init_decay_parameters
from memmix.layers.state import SequenceRows
from memmix.layers.masks import check_hidden_states, compact_rows, valid_tokens
from memmix.layers.norms import GatedRMSNorm, RMSNorm

FADING_RULES = tuple(rule.alias for rule in rules())  # ("gated_delta", "delta", "gla", "linear")
MEMORY_IMPLS = ("auto", "recurrent", "chunk", "triton")
ATTN_IMPLS = ("auto", "dense", "blocked")
MIN_BLOCK = 64  # the blocked path's query blocks hold at least max(window, MIN_BLOCK) tokens


# ---------------------------------------------------------------------------------------------- state / output

@dataclass
class BMojoFState(SequenceRows):
    """Decoding state of one B'MOJO-F layer for N sequences (constant size).

    memory: (N, Hf, Kf, Kf) fading mixer state (float32; float64 for float64 inputs).
    conv: (N, conv_size - 1, 3 Hf Kf) last inputs of the mixer's q, k, v convolutions.
    keys / values: (N, Hkv, w, Dh) in-context ring: the (normed, rotated) key and the value of position p sit
        in slot p % w. fading_keys / fading_values: (N, Hkv, 2w, Dh) fading ring, position p in slot p % 2w.
    seen: (N,) int64 real tokens processed (the position of the next one). A ring slot whose position would be
        negative is empty.
    """

    memory: torch.Tensor
    conv: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    fading_keys: torch.Tensor
    fading_values: torch.Tensor
    seen: torch.Tensor


@dataclass
class BMojoFLayerOutput:
    hidden_states: torch.Tensor  # (B, T, D)
    state: BMojoFState | None
    router_logits: torch.Tensor | None = None  # no router; kept for the block interface


# ---------------------------------------------------------------------------------------------- fading mixer

class FadingMixer(nn.Module):
    """The fading mixer: a Gated-DeltaNet-style block over any memory rule, (..., D) -> fading tokens (..., D).

    q, k, v projections -> causal depthwise conv + SiLU -> memory rule (q, k L2-normalised inside the op) ->
    output-gated RMSNorm per head -> o_proj. Parameters (fla GatedDeltaNet names): q_proj, k_proj, v_proj
    (Hf Kf, D); q_conv1d, k_conv1d, v_conv1d (Hf Kf, 1, W); b_proj (Hf, D) [delta rules]; a_proj (Hf, D),
    A_log (Hf,), dt_bias (Hf,) [gated rules]; g_proj (Hf Kf, D); o_norm (Kf,); o_proj (D, Hf Kf).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rule: str = "gated_delta",
                 conv_size: int = 4, norm_eps: float = 1e-5, impl: str = "auto"):
        super().__init__()
        self.num_heads, self.head_dim, self.rule, self.conv_size, self.impl = num_heads, head_dim, rule, conv_size, impl
        self.inner_dim = num_heads * head_dim
        memory_rule = get_rule(rule)
        self.op, uses_decay, uses_beta = memory_rule.op, memory_rule.uses_gate, memory_rule.uses_beta
        self.q_proj = nn.Linear(hidden_size, self.inner_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.inner_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.inner_dim, bias=False)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            nn.Conv1d(self.inner_dim, self.inner_dim, conv_size, groups=self.inner_dim, padding=conv_size - 1,
                      bias=False) for _ in range(3))  # weight holders, applied functionally
        self.b_proj, self.a_proj, self.A_log, self.dt_bias = head_gate_projections(
            hidden_size, num_heads, uses_beta, uses_decay)
        self.g_proj = nn.Linear(hidden_size, self.inner_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.inner_dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small Xavier weights; decay rates A in (1, 16) and dt in [1e-3, 0.1] as the gated delta rule's."""
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.a_proj, self.g_proj, self.o_proj):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight, gain=2**-2.5)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.o_norm.weight.data.fill_(1.0)
        if self.A_log is not None:
            init_decay_parameters(self.A_log, self.dt_bias)

    def conv_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., 3 Hf Kf): the q, k, v projections before the convolution."""
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def conv_weight(self) -> torch.Tensor:
        """(3 Hf Kf, W) depthwise weights of the q, k, v convolutions; tap W - 1 multiplies the current token."""
        return torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]

    def gates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(..., D) -> the rule's gates: [g (..., Hf) log decay -exp(A_log) softplus(a + dt_bias)] and
        [beta (..., Hf) sigmoid], each present only when the rule takes it (g in >= float32)."""
        gates = []
        if self.a_proj is not None:
            gates.append(log_decay(self.a_proj(x), self.A_log, self.dt_bias))
        if self.b_proj is not None:
            gates.append(self.b_proj(x).sigmoid())
        return gates

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Rule outputs o (..., Hf, Kf) -> gated RMSNorm (gate g_proj(x)) -> o_proj: (..., D)."""
        gate = self.g_proj(x).view(o.shape)
        return self.o_proj(self.o_norm(o, gate).flatten(-2).to(x.dtype))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, use_cache: bool = False):
        """Rows x (N, L, D) whose real tokens are [0, lengths[n]) -> f (N, L, D), and with use_cache the state
        after each row's last real token: memory (N, Hf, Kf, Kf) and conv tails (N, W - 1, 3 Hf Kf)."""
        N, L, _ = x.shape
        W, Hf, Kf = self.conv_size, self.num_heads, self.head_dim
        conv_in = self.conv_inputs(x)  # (N, L, 3 Hf Kf)
        q, k, v = short_conv(conv_in, self.conv_weight()).view(N, L, 3, Hf, Kf).unbind(2)  # (N, L, Hf, Kf) each
        keep = (torch.arange(L, device=x.device) < lengths[:, None])[..., None]  # (N, L, 1)
        # padding (only after a row's real tokens) writes nothing: k = v = g = beta = 0 leave the state as it is
        k, v = k * keep[..., None].to(k.dtype), v * keep[..., None].to(v.dtype)
        gates = [t * keep.to(t.dtype) for t in self.gates(x)]
        o, memory = self.op(q, k, v, *gates, output_final_state=use_cache, use_qk_l2norm=True, impl=self.impl)
        f = self.output(x, o)
        if not use_cache:
            return f, None, None
        return f, memory, row_tails(conv_in, lengths, W)

    def step(self, x: torch.Tensor, memory: torch.Tensor, conv: torch.Tensor):
        """One token per sequence: x (B, D), memory (B, Hf, Kf, Kf), conv (B, W - 1, 3 Hf Kf) ->
        f (B, D), the new memory and conv tails."""
        B = x.shape[0]
        conv_in = self.conv_inputs(x)  # (B, 3 Hf Kf)
        y, tails = short_conv_step(conv_in, self.conv_weight(), conv)  # (B, 3 Hf Kf)
        q, k, v = y.view(B, 1, 3, self.num_heads, self.head_dim).unbind(2)  # (B, 1, Hf, Kf)
        gates = [t[:, None] for t in self.gates(x)]
        o, memory = self.op(q, k, v, *gates, initial_state=memory, output_final_state=True, use_qk_l2norm=True,
                            impl=self.impl)
        return self.output(x, o[:, 0]), memory, tails


# ---------------------------------------------------------------------------------------------- the layer

class BMojoF(nn.Module):
    """B'MOJO-F token mixer: fading mixer + attention over in-context and fading windows under one softmax.

    Input and output (B, T, hidden_size). See the module docstring. Parameters: fading_mixer (FadingMixer);
    q_proj (H Dh, D), k_proj, v_proj (Hkv Dh, D), o_proj (D, H Dh); q_norm, k_norm (Dh,) [qk_norm];
    fading_q_proj (H Dh, D), fading_k_proj, fading_v_proj (Hkv Dh, D), fading_q_norm, fading_k_norm
    [tie_attn_weights=False].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        head_dim: int = 64,
        num_kv_heads: int | None = None,
        window_size: int = 64,
        fading_rule: str = "gated_delta",
        fading_num_heads: int | None = None,
        fading_head_dim: int | None = None,
        tie_attn_weights: bool = True,
        qk_norm: bool = False,
        rope_theta: float | None = 10000.0,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        attn_impl: str = "auto",
        layer_idx: int | None = None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        fading_num_heads = num_heads if fading_num_heads is None else fading_num_heads
        fading_head_dim = head_dim if fading_head_dim is None else fading_head_dim
        check_bmojo_f_args(hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads,
                           window_size=window_size, fading_rule=fading_rule, fading_num_heads=fading_num_heads,
                           fading_head_dim=fading_head_dim, tie_attn_weights=tie_attn_weights, qk_norm=qk_norm,
                           rope_theta=rope_theta, conv_size=conv_size, norm_eps=norm_eps, impl=impl,
                           attn_impl=attn_impl)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.num_kv_heads = num_kv_heads
        self.window_size = window_size
        self.tie_attn_weights, self.qk_norm, self.rope_theta = tie_attn_weights, qk_norm, rope_theta
        self.attn_impl = attn_impl
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5
        self.fading_mixer = FadingMixer(hidden_size, fading_num_heads, fading_head_dim, fading_rule, conv_size,
                                        norm_eps, impl)
        self.q_proj, self.k_proj, self.v_proj = self._projections(hidden_size)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        if not tie_attn_weights:
            self.fading_q_proj, self.fading_k_proj, self.fading_v_proj = self._projections(hidden_size)
            self.fading_q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
            self.fading_k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.reset_parameters()

    def _projections(self, hidden_size: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        kv_dim = self.num_kv_heads * self.head_dim
        return (nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=False),
                nn.Linear(hidden_size, kv_dim, bias=False), nn.Linear(hidden_size, kv_dim, bias=False))

    def reset_parameters(self) -> None:
        """Small Xavier attention weights, norms at 1 (the mixer initialises itself)."""
        for module in self.children():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=2**-2.5)
            elif isinstance(module, RMSNorm):
                module.weight.data.fill_(1.0)

    def state_size(self, include_conv: bool = True) -> int:
        """Floats of decoding state per sequence: Hf Kf^2 + (W - 1) 3 Hf Kf (conv tails, when include_conv)
        + 6 w Hkv Dh (the int64 `seen` aside)."""
        mixer = self.fading_mixer
        conv = (mixer.conv_size - 1) * 3 * mixer.inner_dim if include_conv else 0
        return mixer.num_heads * mixer.head_dim**2 + conv + 6 * self.window_size * self.num_kv_heads * self.head_dim

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> BMojoFState:
        """Empty state for batch_size sequences; dtype is the activations' (the mixer state is >= float32)."""
        mixer, N, w = self.fading_mixer, batch_size, self.window_size
        Hkv, Dh = self.num_kv_heads, self.head_dim
        memory = torch.zeros(N, mixer.num_heads, mixer.head_dim, mixer.head_dim, device=device,
                             dtype=compute_dtype(dtype))
        conv = torch.zeros(N, mixer.conv_size - 1, 3 * mixer.inner_dim, device=device, dtype=dtype)
        ring = lambda size: torch.zeros(N, Hkv, size, Dh, device=device, dtype=dtype)  # noqa: E731
        return BMojoFState(memory, conv, ring(w), ring(w), ring(2 * w), ring(2 * w),
                           torch.zeros(N, dtype=torch.long, device=device))

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: BMojoFState | None = None,
        use_cache: bool = False,
        **unused,
    ) -> BMojoFLayerOutput:
        """hidden_states (B, T, D); attention_mask (B, T_total >= T) 0/1, last T columns used (padding, left or
        right, touches nothing); cu_seqlens int (N + 1,) packed documents (B == 1, no state; with use_cache the
        state has one row per document); state from an earlier call: continue token by token.
        Returns hidden_states (B, T, D) (zeros at padding) and, with use_cache, the state after the input."""
        check_hidden_states(hidden_states, self.hidden_size)
        B, T, _ = hidden_states.shape
        valid = valid_tokens(hidden_states, attention_mask, cu_seqlens)
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a state")
            _check_cu_seqlens(cu_seqlens, T)
        if state is not None:
            if state.seen.shape[0] != B:
                raise ValueError(f"state holds {state.seen.shape[0]} sequences but the input has batch size {B}")
            outputs = []
            for t in range(T):
                out, state = self.step(hidden_states[:, t], valid[:, t], state)
                outputs.append(out)
            return BMojoFLayerOutput(torch.stack(outputs, dim=1), state if use_cache else None)
        rows, lengths, unpack = compact_rows(hidden_states, None if attention_mask is None else valid, cu_seqlens)
        out, new_state = self._parallel(rows, lengths, use_cache)
        return BMojoFLayerOutput(unpack(out), new_state)

    def _parallel(self, x: torch.Tensor, lengths: torch.Tensor, use_cache: bool):
        """Rows x (N, L, D), real tokens at [0, lengths[n]) -> out (N, L, D) and the state (use_cache) or None."""
        N, L, _ = x.shape
        f, memory, conv = self.fading_mixer(x, lengths, use_cache)
        positions = torch.arange(L, device=x.device).expand(N, L)
        q, k, v, fq, fk, fv = self._qkv(x, f, positions)
        query, ctx_keys, fading_keys = _joint_queries(q, k, fq, fk)
        o = banded_attention(query, ctx_keys, v, fading_keys, fv, self.window_size, self.scale, self.attn_impl)
        out = self.o_proj(o.transpose(1, 2).reshape(N, L, self.num_heads * self.head_dim))
        if not use_cache:
            return out, None
        w = self.window_size
        last = lengths - 1
        rings = [_ring_gather(t, last, size) for t, size in ((k, w), (v, w), (fk, 2 * w), (fv, 2 * w))]
        return out, BMojoFState(memory, conv, *rings, lengths.clone())

    def _qkv(self, x: torch.Tensor, f: torch.Tensor, positions: torch.Tensor):
        """x, f (N, L, D); positions (N, L) int64 -> q (N, H, L, Dh), k, v (N, Hkv, L, Dh) from x and the fading
        path's fq (N, H, L, Dh) (q itself when tied), fk, fv (N, Hkv, L, Dh) from f; normed (qk_norm) and rotated."""
        fading_q = self.q_proj if self.tie_attn_weights else self.fading_q_proj
        fading_k = self.k_proj if self.tie_attn_weights else self.fading_k_proj
        fading_v = self.v_proj if self.tie_attn_weights else self.fading_v_proj
        norms = (self.q_norm, self.k_norm) if self.tie_attn_weights else (self.fading_q_norm, self.fading_k_norm)
        q = self._heads(self.q_proj(x), self.q_norm, positions)
        k = self._heads(self.k_proj(x), self.k_norm, positions)
        v = self._heads(self.v_proj(x), None, None)
        fq = q if self.tie_attn_weights else self._heads(fading_q(x), norms[0], positions)
        fk = self._heads(fading_k(f), norms[1], positions)
        fv = self._heads(fading_v(f), None, None)
        return q, k, v, fq, fk, fv

    def _heads(self, t: torch.Tensor, norm: RMSNorm | None, positions: torch.Tensor | None) -> torch.Tensor:
        """(N, L, h Dh) -> (N, h, L, Dh), RMS-normed per head (norm) and rotated at positions (N, L) (rope on)."""
        N, L, _ = t.shape
        t = t.view(N, L, -1, self.head_dim)
        if norm is not None:
            t = norm(t)
        t = t.transpose(1, 2)
        if positions is not None and self.rope_theta is not None:
            t = apply_rope(t, positions, self.rope_theta)
        return t

    # ------------------------------------------------------------------------------------------ decoding
    def step(self, x: torch.Tensor, valid: torch.Tensor, state: BMojoFState) -> tuple[torch.Tensor, BMojoFState]:
        """One token per sequence: x (B, D), valid (B,) bool -> out (B, D) and the new state (padding: output 0,
        state unchanged)."""
        B = x.shape[0]
        w = self.window_size
        f, memory, conv = self.fading_mixer.step(x, state.memory, state.conv)
        position = state.seen  # (B,)
        q, k, v, fq, fk, fv = self._qkv(x[:, None], f[:, None].to(x.dtype), position[:, None])  # (B, h, 1, Dh)
        keys, values = (_ring_write(r, t, position) for r, t in ((state.keys, k), (state.values, v)))
        fading_keys, fading_values = (_ring_write(r, t, position) for r, t in
                                      ((state.fading_keys, fk), (state.fading_values, fv)))
        ctx_pos = _ring_positions(position, w)  # (B, w)
        fading_pos = _ring_positions(position, 2 * w)  # (B, 2w)
        mask = torch.cat([ctx_pos >= 0, (fading_pos >= 0) & (fading_pos <= position[:, None] - w)], dim=1)
        query, ctx_keys, band_keys = _joint_queries(q, keys, fq, fading_keys)
        o = F.scaled_dot_product_attention(_fold_groups(query, self.num_kv_heads), torch.cat([ctx_keys, band_keys], 2),
                                           torch.cat([values, fading_values], 2), attn_mask=mask[:, None, None],
                                           scale=self.scale)  # (B, Hkv, group, Dh): one query per head
        out = self.o_proj(o.reshape(B, self.num_heads * self.head_dim)) * valid[:, None].to(x.dtype)
        new_state = BMojoFState(memory, conv.to(state.conv.dtype), keys.to(state.keys.dtype),
                                values.to(state.values.dtype), fading_keys.to(state.fading_keys.dtype),
                                fading_values.to(state.fading_values.dtype), position + 1)
        return out, new_state.where(valid, state)


# ---------------------------------------------------------------------------------------------- attention

def band_mask(length: int, window: int, device=None) -> torch.Tensor:
    """(L, 2L) bool: query i sees in-context key j (first L columns) when 0 <= i - j < w and fading key j
    (last L columns) when w <= i - j < 2w."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None]
    return torch.cat([(distance >= 0) & (distance < window), (distance >= window) & (distance < 2 * window)], -1)


def banded_attention(query, ctx_keys, ctx_values, fading_keys, fading_values, window: int, scale: float,
                     impl: str = "auto") -> torch.Tensor:
    """One softmax over in-context keys at distance [0, w) and fading keys at distance [w, 2w) of each query.

    query (N, H, L, E); ctx_keys, fading_keys (N, Hkv, L, E); ctx_values, fading_values (N, Hkv, L, Dv), with
    H a multiple of Hkv (head h reads kv head h // (H / Hkv)). impl: "dense" (one SDPA, (L, 2L) mask),
    "blocked" (query blocks against the keys they can reach, memory O(L (block + w))) or "auto" (dense while a
    block's keys, 2 (block + w - 1), would be as many as the row's 2L; blocked above). Returns (N, H, L, Dv).
    """
    L = query.shape[2]
    window = min(window, L)  # a window past the row start sees the same keys: the fading band is then empty
    if impl == "dense" or (impl == "auto" and L <= block_size(window) + window - 1):  # blocks would save nothing
        keys, values = torch.cat([ctx_keys, fading_keys], 2), torch.cat([ctx_values, fading_values], 2)
        group = query.shape[1] // keys.shape[1]
        mask = band_mask(L, window, query.device).repeat(group, 1)  # (group L, 2L)
        out = F.scaled_dot_product_attention(_fold_groups(query, keys.shape[1]), keys, values, attn_mask=mask,
                                             scale=scale)
        return _unfold_groups(out, group)
    return _blocked_attention(query, ctx_keys, ctx_values, fading_keys, fading_values, window, scale)


def block_size(window: int) -> int:
    """Queries per block of the blocked path: >= max(window, MIN_BLOCK), with block + window - 1 (the keys of
    one source a block reads) a multiple of 8, so masks are aligned for CUDA's kernels."""
    return -(-(max(window, MIN_BLOCK) + window - 1) // 8) * 8 - (window - 1)


def _fold_groups(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(N, H, L, E) -> (N, Hkv, (H / Hkv) L, E): the query heads sharing a kv head become one longer query axis,
    so grouped heads need neither copied keys nor SDPA's enable_gqa (which CUDA's masked kernels lack)."""
    N, H, L, E = query.shape
    return query.reshape(N, kv_heads, (H // kv_heads) * L, E)


def _unfold_groups(out: torch.Tensor, group: int) -> torch.Tensor:
    """(N, Hkv, group L, Dv) -> (N, Hkv group, L, Dv)."""
    N, Hkv, GL, Dv = out.shape
    return out.reshape(N, Hkv * group, GL // group, Dv)


def _blocked_attention(query, ctx_keys, ctx_values, fading_keys, fading_values, window: int,
                       scale: float) -> torch.Tensor:
    """banded_attention by query blocks of C >= max(w, MIN_BLOCK) tokens (shapes as there).

    Block j (queries [jC, jC + C)) reads the C + w - 1 in-context keys [jC - w + 1, jC + C) and the C + w - 1
    fading keys [jC - 2w + 1, jC + C - w); in both, query a sees key b of the block when a <= b <= a + w - 1.
    All blocks go through one 4-D SDPA call.
    """
    N, H, L, E = query.shape
    Hkv = ctx_keys.shape[1]
    group = H // Hkv
    w = window
    P = w - 1
    C = min(block_size(w), L)
    NB = -(-L // C)
    pad = NB * C - L

    def blocks(t: torch.Tensor, front: int) -> torch.Tensor:
        """(N, Hkv, L, X) -> (N, NB, Hkv, C + P, X): block j holds positions [jC - front, jC - front + C + P)."""
        t = F.pad(t, (0, 0, front, pad))[:, :, : NB * C + P]
        return t.unfold(2, C + P, C).permute(0, 2, 1, 4, 3)

    S = 2 * (C + P)
    keys = torch.cat([blocks(ctx_keys, P), blocks(fading_keys, P + w)], dim=3).reshape(N * NB, Hkv, S, E)
    values = torch.cat([blocks(ctx_values, P), blocks(fading_values, P + w)], dim=3).reshape(N * NB, Hkv, S, -1)
    q = F.pad(query, (0, 0, 0, pad)).view(N, Hkv, group, NB, C, E).permute(0, 3, 1, 2, 4, 5)
    q = q.reshape(N * NB, Hkv, group * C, E)  # (N NB, Hkv, group C, E)
    device = query.device
    a, b = torch.arange(C, device=device)[:, None], torch.arange(C + P, device=device)[None]
    band = (b >= a) & (b <= a + P)  # (C, C + P)
    start = torch.arange(NB, device=device)[:, None] * C  # (NB, 1)
    ctx_real = (start - P + b) >= 0  # (NB, C + P): keys before the row start are padding
    fading_real = (start - P - w + b) >= 0
    mask = torch.cat([band & ctx_real[:, None], band & fading_real[:, None]], dim=-1)  # (NB, C, S)
    mask = mask.repeat(1, group, 1).expand(N, NB, group * C, S).reshape(N * NB, 1, group * C, S)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # (N NB, Hkv, group C, Dv)
    out = out.view(N, NB, Hkv, group, C, -1).permute(0, 2, 3, 1, 4, 5)
    return out.reshape(N, H, NB * C, -1)[:, :, :L]


def _joint_queries(q, k, fq, fk):
    """Queries and keys for one SDPA over both sources. Tied (fq is q): (q, k, fk). Untied: the fading path's
    logits use its own query, so queries become [q, fq] and keys [k, 0] / [0, fk] along the feature dim
    (q . k and fq . fk exactly); q, fq (N, H, L, E); k, fk (N, Hkv, S, E)."""
    if fq is q:
        return q, k, fk
    return (torch.cat([q, fq], -1), torch.cat([k, torch.zeros_like(k)], -1),
            torch.cat([torch.zeros_like(fk), fk], -1))


# ---------------------------------------------------------------------------------------------- rings

def _ring_positions(last: torch.Tensor, size: int) -> torch.Tensor:
    """Position held by each slot of a ring of `size` (position p in slot p % size) whose newest entry is
    position last (N,): (N, size) int64, negative = empty."""
    slots = torch.arange(size, device=last.device)
    return last[:, None] - torch.remainder(last[:, None] - slots, size)


def _ring_gather(t: torch.Tensor, last: torch.Tensor, size: int) -> torch.Tensor:
    """The ring of `size` slots over the tokens of t (N, h, L, Dh) up to position last (N,): (N, h, size, Dh)."""
    positions = _ring_positions(last, size)  # (N, size)
    index = positions.clamp(min=0)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
    return t.gather(2, index) * (positions >= 0)[:, None, :, None].to(t.dtype)


def _ring_write(ring: torch.Tensor, new: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """ring (N, h, size, Dh) with new (N, h, 1, Dh) written at slot position % size, position (N,) int64."""
    slot = torch.remainder(position, ring.shape[2])
    hit = torch.arange(ring.shape[2], device=ring.device)[None] == slot[:, None]  # (N, size)
    return torch.where(hit[:, None, :, None], new.to(ring.dtype), ring)


# ---------------------------------------------------------------------------------------------- checks

def _check_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [0, ..., T] of length N + 1 >= 2, "
                         f"got shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seq_len or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T = {seq_len}, got {bounds}")


def check_bmojo_f_args(*, hidden_size, num_heads, head_dim, num_kv_heads, window_size, fading_rule,
                       fading_num_heads, fading_head_dim, tie_attn_weights, qk_norm, rope_theta, conv_size,
                       norm_eps, impl, attn_impl) -> None:
    """Raise ValueError naming the first bad B'MOJO-F argument and its allowed values (None defaults resolved)."""
    for name, value, minimum in (("hidden_size", hidden_size, 1), ("num_heads", num_heads, 1),
                                 ("head_dim", head_dim, 1), ("num_kv_heads", num_kv_heads, 1),
                                 ("window_size", window_size, 1), ("fading_num_heads", fading_num_heads, 1),
                                 ("fading_head_dim", fading_head_dim, 1), ("conv_size", conv_size, 2)):
        if not is_int(value) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads must divide num_heads={num_heads}, got {num_kv_heads}")
    if fading_rule not in FADING_RULES:
        raise ValueError(f"fading_rule must be one of {FADING_RULES}, got {fading_rule!r}")
    for name, flag in (("tie_attn_weights", tie_attn_weights), ("qk_norm", qk_norm)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if rope_theta is not None:
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
            raise ValueError(f"rope_theta must be a number > 0 or None (no rotary embedding), got {rope_theta!r}")
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even with rotary embeddings (rope_theta set), got {head_dim}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
        raise ValueError(f"norm_eps must be a number > 0, got {norm_eps!r}")
    if impl not in MEMORY_IMPLS:
        raise ValueError(f"impl must be one of {MEMORY_IMPLS}, got {impl!r}")
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")


# ---------------------------------------------------------------------------------------------- reference

def bmojo_f_reference(layer: BMojoF, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """B'MOJO-F written from its description, with `layer`'s weights: every sequence (batch row's real tokens,
    or packed document) on its own; the convolution tap by tap, the memory rule's step loop, and full attention
    over [x-keys; f-keys] with the two band masks. hidden_states (B, T, D) -> (B, T, D), zeros at padding."""
    B, T, _ = hidden_states.shape
    out = torch.zeros_like(hidden_states)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        sequences = [(0, torch.arange(a, b)) for a, b in zip(bounds, bounds[1:])]
    else:
        mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask[:, -T:].bool().cpu()
        sequences = [(b, mask[b].nonzero()[:, 0]) for b in range(B)]
    for b, index in sequences:
        if index.numel() > 0:
            out[b, index.to(out.device)] = _reference_sequence(layer, hidden_states[b, index.to(out.device)])
    return out


def _reference_sequence(layer: BMojoF, x: torch.Tensor) -> torch.Tensor:
    """One sequence x (n, D) -> (n, D)."""
    n = x.shape[0]
    H, Hkv, Dh, w = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.window_size
    f = _reference_fading(layer.fading_mixer, x)  # (n, D)
    positions = torch.arange(n, device=x.device)

    def heads(t, norm, rotate=True):  # (n, h Dh) -> (h, n, Dh)
        t = t.view(n, -1, Dh)
        t = norm(t) if norm is not None else t
        t = t.transpose(0, 1)
        if rotate and layer.rope_theta is not None:
            t = apply_rope(t[None], positions[None], layer.rope_theta)[0]
        return t

    q, k = heads(layer.q_proj(x), layer.q_norm), heads(layer.k_proj(x), layer.k_norm)
    v = heads(layer.v_proj(x), None, False)
    if layer.tie_attn_weights:
        fq, fk = q, heads(layer.k_proj(f), layer.k_norm)
        fv = heads(layer.v_proj(f), None, False)
    else:
        fq, fk = heads(layer.fading_q_proj(x), layer.fading_q_norm), heads(layer.fading_k_proj(f), layer.fading_k_norm)
        fv = heads(layer.fading_v_proj(f), None, False)
    group = H // Hkv
    k, v, fk, fv = (t.repeat_interleave(group, dim=0) for t in (k, v, fk, fv))  # (H, n, Dh)
    distance = positions[:, None] - positions[None, :]  # (n, n) i - j
    in_context = (distance >= 0) & (distance <= w - 1)  # j in [i - w + 1, i]
    fading = (distance >= w) & (distance <= 2 * w - 1)  # j in [i - 2w + 1, i - w]
    logits = torch.cat([(q @ k.transpose(1, 2) * Dh**-0.5).masked_fill(~in_context, float("-inf")),
                        (fq @ fk.transpose(1, 2) * Dh**-0.5).masked_fill(~fading, float("-inf"))], dim=-1)
    probs = logits.softmax(-1)  # (H, n, 2n): one normalisation over both sources
    o = probs[..., :n] @ v + probs[..., n:] @ fv  # (H, n, Dh)
    return layer.o_proj(o.transpose(0, 1).reshape(n, H * Dh))


def _reference_fading(mixer: FadingMixer, x: torch.Tensor) -> torch.Tensor:
    """Fading tokens of one sequence x (n, D) -> (n, D): conv tap by tap, the rule's step loop."""
    n = x.shape[0]
    Hf, Kf, W = mixer.num_heads, mixer.head_dim, mixer.conv_size
    u = torch.cat([mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)], dim=-1)  # (n, 3 Hf Kf)
    weight = torch.cat([mixer.q_conv1d.weight, mixer.k_conv1d.weight, mixer.v_conv1d.weight])[:, 0]  # (C, W)
    rows = []
    for t in range(n):
        # tap W - 1 multiplies token t, tap W - 1 - j token t - j (causal cross-correlation)
        rows.append(sum(weight[:, W - 1 - j] * u[t - j] for j in range(min(W, t + 1))))
    q, k, v = F.silu(torch.stack(rows)).view(n, 3, Hf, Kf).unbind(1)
    gates = []
    if mixer.a_proj is not None:
        gates.append(-mixer.A_log.exp() * F.softplus(mixer.a_proj(x) + mixer.dt_bias))
    if mixer.b_proj is not None:
        gates.append(torch.sigmoid(mixer.b_proj(x)))
    o, _ = mixer.op(q[None], k[None], v[None], *(g[None] for g in gates), use_qk_l2norm=True, impl="recurrent")
    o = mixer.o_norm(o[0], mixer.g_proj(x).view(n, Hf, Kf))
    return mixer.o_proj(o.reshape(n, Hf * Kf))
