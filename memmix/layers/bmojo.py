"""The B'MOJO layer (Zancato et al., arXiv 2407.06324): eidetic plus fading memory read by one attention.

Every token is projected once into (q, k, v) (causal short convolution + SiLU). The same keys and values feed
three memories that a single softmax attention reads per head:

- fading memory: a linear recurrence over the whole past (gated delta rule by default; "gla" is the
  diagonal-decay SSM option, a scalar decay per head and token as in Mamba-2; "delta" and "linear" also work).
  Its read-out at token t is projected into one *fading token* (a key and a value) that only query t sees.
- recent window: the exact keys/values of the last `window_size` tokens (the token itself included).
- eidetic store: at most `eidetic_size` exact tokens per head kept from further back. A token is admitted
  by the *innovation test*: its innovation is the part of its value that the fading memory could not
  predict from its key, score_t = |v_t - exp(g_t) S_{t-1}^T k_t|^2 / (|v_t|^2 + eps) (S_{t-1} the fading
  state before t, k_t L2-normalised). After every chunk of `chunk_size` tokens, the `eidetic_per_chunk`
  tokens of that chunk with the largest innovation are offered to the store; the store then keeps the
  `eidetic_size` best entries by innovation (eviction "score") or the most recent admissions ("fifo").
  Stored tokens still inside a query's window are masked for that query, so no token is read twice.

Attention has no positional encoding (as Jamba's attention layers): order reaches it through the short
convolution and the fading token, and stored tokens far in the past carry no position the model never
saw in training. Choices the paper leaves open and this implementation fixes: one fading token per query
(read at the query's own position rather than at chunk ends), per-head stores, the innovation measured on
the fading memory's own key -> value prediction, admissions at chunk ends.

Training path (no incoming state): chunkwise. The memory rule runs chunkwise over 2H heads (the H heads
reading with q, plus H copies reading with the next token's key, which gives every token's prediction
S_{t-1}^T k_t in the same pass); the store is a scan over chunks that only moves indices; attention for a
chunk reads its own and the previous ceil((window - 1) / chunk) chunks, the store and the fading token.
Cost is linear in length. Decoding (an incoming state) runs one recurrent step per token; its state
(BMojoState) is bounded: fading state, conv tails, window, store and the current chunk's best candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memmix import ops
from memmix.checks import is_int
from memmix.layers.gates import head_gate_projections, init_decay_parameters
from memmix.layers.state import SequenceRows
from memmix.layers.masks import check_hidden_states, compact_rows, valid_tokens
from memmix.layers.norms import RMSNorm
from memmix.ops.common import log_decay
from memmix.ops.dtypes import compute_dtype
from memmix.ops.registry import get_rule, rules
from memmix.ops.short_conv import row_tails, short_conv, short_conv_step

FADING_RULES = tuple(rule.alias for rule in rules())  # ("gated_delta", "delta", "gla", "linear")
EVICTIONS = ("score", "fifo")
INNOVATION_EPS = 1e-6
NEG_INF = float("-inf")


@dataclass
class BMojoState(SequenceRows):
    """Recurrent state of one B'MOJO layer for N sequences (H heads of size Dh; w window, E store, a admissions).

    memory: (N, H, Dh, Dh) fading state (float32, float64 for float64 inputs).
    conv: (N, conv_size - 1, 3 H Dh) last inputs of the q, k, v convolutions.
    window_keys / window_values: (N, H, w - 1, Dh) the previous w - 1 real tokens, oldest first;
    window_valid: (N, w - 1) bool.
    store_keys / store_values: (N, H, E, Dh); store_scores: (N, H, E) innovation (-inf = empty slot);
    store_positions: (N, H, E) int64 token positions.
    pending_*: the same for the best a candidates of the current, unfinished chunk.
    seen: (N,) int64 real tokens processed so far.
    """

    memory: torch.Tensor
    conv: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    window_valid: torch.Tensor
    store_keys: torch.Tensor
    store_values: torch.Tensor
    store_scores: torch.Tensor
    store_positions: torch.Tensor
    pending_keys: torch.Tensor
    pending_values: torch.Tensor
    pending_scores: torch.Tensor
    pending_positions: torch.Tensor
    seen: torch.Tensor

    @property
    def store_size(self) -> torch.Tensor:
        """(N, H) int64 occupied store slots."""
        return torch.isfinite(self.store_scores).sum(-1)


@dataclass
class BMojoLayerOutput:
    hidden_states: torch.Tensor  # (B, T, D)
    state: BMojoState | None
    router_logits: torch.Tensor | None = None  # no router; kept for the block interface


class BMojo(nn.Module):
    """B'MOJO token mixer. Input and output (B, T, hidden_size). See the module docstring.

    Parameters: q_proj, k_proj, v_proj (H Dh, D); conv1d.weight (3 H Dh, 1, W); b_proj (H, D) [delta rules];
    a_proj (H, D), A_log (H,), dt_bias (H,) [gated rules]; fading_norm (Dh,); fading_k_proj, fading_v_proj
    (H Dh, H Dh); o_proj (D, H Dh).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        head_dim: int = 64,
        fading_rule: str = "gated_delta",
        window_size: int = 64,
        chunk_size: int = 64,
        eidetic_size: int = 64,
        eidetic_per_chunk: int = 4,
        eviction: str = "score",
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        layer_idx: int | None = None,
    ):
        super().__init__()
        check_bmojo_args(hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim, fading_rule=fading_rule,
                         window_size=window_size, chunk_size=chunk_size, eidetic_size=eidetic_size,
                         eidetic_per_chunk=eidetic_per_chunk, eviction=eviction, conv_size=conv_size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.inner_dim = num_heads * head_dim
        self.fading_rule = fading_rule
        self.window_size = window_size
        self.chunk_size = chunk_size
        self.eidetic_size = eidetic_size
        self.eidetic_per_chunk = eidetic_per_chunk if eidetic_size > 0 else 0
        self.eviction = eviction
        self.conv_size = conv_size
        self.impl = impl
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, self.inner_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.inner_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.inner_dim, bias=False)
        self.conv1d = nn.Conv1d(3 * self.inner_dim, 3 * self.inner_dim, conv_size, groups=3 * self.inner_dim,
                                padding=conv_size - 1, bias=False)  # weight holder, applied functionally
        rule = get_rule(fading_rule)
        self.b_proj, self.a_proj, self.A_log, self.dt_bias = head_gate_projections(
            hidden_size, num_heads, rule.uses_beta, rule.uses_gate)
        self.fading_norm = RMSNorm(head_dim, eps=norm_eps)
        self.fading_k_proj = nn.Linear(self.inner_dim, self.inner_dim, bias=False)
        self.fading_v_proj = nn.Linear(self.inner_dim, self.inner_dim, bias=False)
        self.o_proj = nn.Linear(self.inner_dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small Xavier weights; decay rates A in (1, 16) and dt in [1e-3, 0.1] as the gated delta rule's."""
        gain = 2**-2.5
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.a_proj, self.fading_k_proj,
                       self.fading_v_proj, self.o_proj):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight, gain=gain)
        self.conv1d.reset_parameters()
        self.fading_norm.weight.data.fill_(1.0)
        if self.A_log is not None:
            init_decay_parameters(self.A_log, self.dt_bias)

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> BMojoState:
        """Empty state for batch_size sequences."""
        N, H, Dh = batch_size, self.num_heads, self.head_dim
        w, E, a = self.window_size - 1, self.eidetic_size, self.eidetic_per_chunk

        def zeros(*shape, dtype=dtype):
            return torch.zeros(*shape, device=device, dtype=dtype)

        def empty_tokens(n):  # keys, values, scores (-inf = empty), positions
            return (zeros(N, H, n, Dh), zeros(N, H, n, Dh), torch.full((N, H, n), NEG_INF, device=device, dtype=dtype),
                    zeros(N, H, n, dtype=torch.long))

        return BMojoState(zeros(N, H, Dh, Dh), zeros(N, self.conv_size - 1, 3 * self.inner_dim), zeros(N, H, w, Dh),
                          zeros(N, H, w, Dh), zeros(N, w, dtype=torch.bool), *empty_tokens(E), *empty_tokens(a),
                          zeros(N, dtype=torch.long))

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: BMojoState | None = None,
        use_cache: bool = False,
        **unused,
    ) -> BMojoLayerOutput:
        """hidden_states (B, T, D); attention_mask (B, T_total) 0/1, last T columns used (pads touch nothing);
        cu_seqlens int64 (N + 1,) for packed documents (B == 1, no state); state from an earlier call."""
        check_hidden_states(hidden_states, self.hidden_size)
        B, T, _ = hidden_states.shape
        valid = valid_tokens(hidden_states, attention_mask, cu_seqlens)
        if state is not None:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a state")
            if state.memory.shape[0] != B:
                raise ValueError(f"state holds {state.memory.shape[0]} sequences but the input has {B}")
            return self._step_loop(hidden_states, valid, state, use_cache)
        x, lengths, unpack = compact_rows(hidden_states, None if attention_mask is None else valid, cu_seqlens)
        out, new_state = self._chunked(x, lengths, use_cache)
        return BMojoLayerOutput(unpack(out), new_state)

    def _conv_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., 3 H Dh): the q, k, v projections before the convolution."""
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def _gates(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(..., D) -> beta (..., H) sigmoid, g (..., H) log decay -exp(A_log) softplus(a + dt_bias)."""
        beta = None if self.b_proj is None else self.b_proj(x).to(dtype).sigmoid()
        g = None
        if self.a_proj is not None:
            g = log_decay(self.a_proj(x), self.A_log, self.dt_bias, dtype)
        return beta, g

    def _fading_tokens(self, o_fading: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fading read-outs (..., H, Dh) -> the fading token's key and value (..., H, Dh) each."""
        flat = self.fading_norm(o_fading).flatten(-2).to(self.fading_k_proj.weight.dtype)
        shape = o_fading.shape
        return self.fading_k_proj(flat).view(shape), self.fading_v_proj(flat).view(shape)

    @staticmethod
    def _innovation(v: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """|v - prediction|^2 / (|v|^2 + eps) over the last dim, without gradient: (..., Dh) -> (...)."""
        v, prediction = v.detach(), prediction.detach()
        return (v - prediction).pow(2).sum(-1) / (v.pow(2).sum(-1) + INNOVATION_EPS)

    def _merge_top(self, scores, positions, keys, values, k: int, by_position: bool):
        """Keep the k best of a pool of tokens per head.

        scores (N, H, P) (-inf = empty); positions (N, H, P) int64; keys / values (N, H, P, Dh) or None.
        by_position: rank valid entries by recency instead of score. Returns the four, with P -> k.
        """
        rank = scores
        if by_position:
            rank = torch.where(torch.isfinite(scores), positions.to(scores.dtype), scores)
        index = rank.topk(k, dim=-1).indices  # (N, H, k)
        scores, positions = scores.gather(-1, index), positions.gather(-1, index)
        if keys is not None:
            full = index.unsqueeze(-1).expand(*index.shape, keys.shape[-1])
            keys, values = keys.gather(2, full), values.gather(2, full)
        return scores, positions, keys, values

    # ------------------------------------------------------------------------------------------ chunked path
    def _chunked(self, x: torch.Tensor, lengths: torch.Tensor, use_cache: bool):
        """Training / prefill path from an empty state.

        x (N, L, D) with the real tokens of row n at [0, lengths[n]); returns out (N, L, D) and the state.
        """
        N, L, _ = x.shape
        H, Dh, C = self.num_heads, self.head_dim, self.chunk_size
        dtype = compute_dtype(x.dtype)
        valid = torch.arange(L, device=x.device) < lengths[:, None]  # (N, L)
        conv_in = self._conv_inputs(x) * valid[..., None].to(x.dtype)  # (N, L, 3 H Dh)
        q, k, v = short_conv(conv_in, self.conv1d.weight[:, 0]).view(N, L, 3, H, Dh).unbind(2)  # (N, L, H, Dh) each
        beta, g = self._gates(x, dtype)
        keep = valid[..., None]
        k, v = k * keep[..., None].to(k.dtype), v * keep[..., None].to(v.dtype)
        beta = None if beta is None else beta * keep
        g = None if g is None else g * keep

        o_fading, prediction, final = self._fading_with_predictions(q, k, v, g, beta, use_cache)
        score = self._innovation(v.to(dtype), prediction).masked_fill(~keep, NEG_INF)  # (N, L, H)
        fading_k, fading_v = self._fading_tokens(o_fading.to(x.dtype))

        NC = L // C + 1  # one chunk more than full ones: the (possibly empty) chunk a cache continues
        pad = NC * C - L
        q, k, v, fading_k, fading_v = (_pad_time(t, pad).transpose(1, 2) for t in (q, k, v, fading_k, fading_v))
        score = _pad_time(score, pad, NEG_INF).transpose(1, 2).reshape(N, H, NC, C)  # (N, H, NC, C)
        stores, candidates = self._store_scan(score)
        out = self._chunk_attention(q, k, v, fading_k, fading_v, stores, lengths)  # (N, H, NC*C, Dh)
        out = self.o_proj(out.transpose(1, 2)[:, :L].reshape(N, L, self.inner_dim).to(x.dtype))
        new_state = None
        if use_cache:
            new_state = self._prefill_state(final, conv_in, k, v, stores, candidates, lengths, dtype)
        return out, new_state

    def _fading_with_predictions(self, q, k, v, g, beta, use_cache: bool):
        """Run the fading rule once over 2H heads: read-outs S_t^T q_t and predictions exp(g_t) S_{t-1}^T k_t.

        q, k, v (N, L, H, Dh); g, beta (N, L, H) or None. Returns o (N, L, H, Dh) (scaled by Dh^-0.5) and
        prediction (N, L, H, Dh) in v's dtype, and the final state (N, H, Dh, Dh) in the compute dtype or None.
        Costs two passes of the rule (2H heads); the predictions only steer which tokens the store admits.
        """
        H, Dh = self.num_heads, self.head_dim
        next_k = torch.cat([k[:, 1:], torch.zeros_like(k[:, :1])], dim=1)  # read with the next token's key
        doubled = [torch.cat([a, b], dim=2) for a, b in ((q, next_k), (k, k), (v, v))]
        gates = [torch.cat([t, t], dim=2) for t in (g, beta) if t is not None]
        o, final = get_rule(self.fading_rule).op(*doubled, *gates, scale=1.0, output_final_state=use_cache,
                                                 use_qk_l2norm=True, impl=self.impl)
        o_fading = o[:, :, :H] * Dh**-0.5
        after = o[:, :, H:]  # S_t^T k_{t+1}: the state before token t + 1 read with its key
        prediction = torch.cat([torch.zeros_like(after[:, :1]), after[:, :-1]], dim=1)  # empty state before t = 0
        if g is not None:
            prediction = prediction * g.to(prediction.dtype).exp()[..., None]
        return o_fading, prediction, None if final is None else final[:, :H]

    def _store_scan(self, score: torch.Tensor):
        """Store contents entering every chunk, from the innovation scores (no gradient, indices only).

        score (N, H, NC, C), -inf at pads. Returns stores = (scores, positions) each (N, H, NC, E): the store
        in force while chunk j runs; and candidates = (scores, positions) each (N, H, NC, a): every chunk's
        best a tokens.
        """
        N, H, NC, C = score.shape
        E, a = self.eidetic_size, self.eidetic_per_chunk
        base = torch.arange(NC, device=score.device).view(1, 1, NC, 1) * C
        cand_scores, cand_local = score.topk(a, dim=-1)  # (N, H, NC, a)
        cand_positions = cand_local + base
        if E == 0:
            empty = score.new_full((N, H, NC, 0), NEG_INF)
            return (empty, empty.long()), (cand_scores, cand_positions)
        store_scores = score.new_full((N, H, E), NEG_INF)
        store_positions = torch.zeros(N, H, E, dtype=torch.long, device=score.device)
        entering_scores, entering_positions = [], []
        for j in range(NC):
            entering_scores.append(store_scores)
            entering_positions.append(store_positions)
            pool_scores = torch.cat([store_scores, cand_scores[:, :, j]], dim=-1)
            pool_positions = torch.cat([store_positions, cand_positions[:, :, j]], dim=-1)
            store_scores, store_positions, _, _ = self._merge_top(pool_scores, pool_positions, None, None, E,
                                                                  self.eviction == "fifo")
        stores = (torch.stack(entering_scores, 2), torch.stack(entering_positions, 2))
        return stores, (cand_scores, cand_positions)

    def _chunk_attention(self, q, k, v, fading_k, fading_v, stores, lengths) -> torch.Tensor:
        """Softmax attention of every query over [store, window, its fading token], chunk by chunk, at once.

        q, k, v, fading_k, fading_v: (N, H, NC*C, Dh); stores from _store_scan; lengths (N,).
        Returns (N, H, NC*C, Dh).
        """
        N, H, LP, Dh = q.shape
        C, w = self.chunk_size, self.window_size
        NC = LP // C
        P = -(-(w - 1) // C) * C  # earlier tokens a chunk's window can reach, rounded up to whole chunks
        device = q.device
        qc = q.reshape(N, H, NC, C, Dh)
        window_k = F.pad(k, (0, 0, P, 0)).unfold(2, P + C, C).transpose(-1, -2)  # (N, H, NC, P + C, Dh)
        window_v = F.pad(v, (0, 0, P, 0)).unfold(2, P + C, C).transpose(-1, -2)
        query_pos = torch.arange(NC, device=device).view(NC, 1) * C + torch.arange(C, device=device)  # (NC, C)
        key_pos = query_pos[:, :1] - P + torch.arange(P + C, device=device)  # (NC, P + C)
        distance = query_pos[:, :, None] - key_pos[:, None, :]  # (NC, C, P + C)
        key_real = (key_pos >= 0)[None] & (key_pos[None] < lengths.view(N, 1, 1))  # (N, NC, P + C)
        window_mask = ((distance >= 0) & (distance < w))[None] & key_real[:, :, None, :]  # (N, NC, C, P + C)
        scale = Dh**-0.5
        logits = [torch.einsum("nhjcd,nhjrd->nhjcr", qc, window_k) * scale]
        masks = [window_mask[:, None]]
        values = [window_v]
        if self.eidetic_size > 0:
            store_scores, store_positions = stores  # (N, H, NC, E)
            index = store_positions.reshape(N, H, -1, 1).expand(-1, -1, -1, Dh)
            store_k = k.gather(2, index).view(N, H, NC, -1, Dh)
            store_v = v.gather(2, index).view(N, H, NC, -1, Dh)
            old_enough = query_pos.view(1, 1, NC, C, 1) - store_positions[:, :, :, None, :] >= w
            masks.append(old_enough & torch.isfinite(store_scores)[:, :, :, None, :])  # (N, H, NC, C, E)
            logits.append(torch.einsum("nhjcd,nhjed->nhjce", qc, store_k) * scale)
            values.append(store_v)
        logits.append((qc * fading_k.reshape(N, H, NC, C, Dh)).sum(-1, keepdim=True) * scale)
        masks.append(torch.ones(1, 1, 1, 1, 1, dtype=torch.bool, device=device))
        sizes = [t.shape[-1] for t in logits]
        full_logits = torch.cat([lg.masked_fill(~m, NEG_INF) for lg, m in zip(logits, masks)], dim=-1)
        probs = full_logits.to(compute_dtype(q.dtype)).softmax(-1).to(q.dtype)
        parts = probs.split(sizes, dim=-1)
        out = parts[-1] * fading_v.reshape(N, H, NC, C, Dh)
        for p, val in zip(parts[:-1], values):
            out = out + torch.einsum("nhjcr,nhjrd->nhjcd", p, val)
        return out.reshape(N, H, LP, Dh)

    def _prefill_state(self, final, conv_in, k, v, stores, candidates, lengths, dtype) -> BMojoState:
        """The state after each row's last real token. k, v (N, H, LP, Dh); conv_in (N, L, 3 H Dh)."""
        N, H, LP, Dh = k.shape
        device = k.device
        W, w, C = self.conv_size, self.window_size, self.chunk_size
        tails = row_tails(conv_in, lengths, W)
        win_pos = lengths[:, None] - (w - 1) + torch.arange(w - 1, device=device)  # (N, w - 1)
        win_valid = win_pos >= 0
        win_k, win_v = _gather_tokens(k, v, win_pos.clamp(min=0)[:, None].expand(N, H, -1))
        zero = ~win_valid[:, None, :, None]
        win_k, win_v = win_k.masked_fill(zero, 0), win_v.masked_fill(zero, 0)
        chunk = (lengths // C).view(N, 1, 1, 1)

        def at_chunk(t):  # (N, H, NC, X) -> (N, H, X) at chunk lengths // C
            return t.gather(2, chunk.expand(N, H, 1, t.shape[-1])).squeeze(2)

        store_scores, store_positions = (at_chunk(t) for t in stores)
        pending_scores, pending_positions = (at_chunk(t) for t in candidates)
        store_k, store_v = _gather_tokens(k, v, store_positions)
        pending_k, pending_v = _gather_tokens(k, v, pending_positions)
        if final is None:
            final = k.new_zeros(N, H, Dh, Dh, dtype=dtype)
        cast = lambda t: t.to(dtype)  # noqa: E731
        return BMojoState(final, cast(tails), cast(win_k), cast(win_v), win_valid, cast(store_k), cast(store_v),
                          cast(store_scores), store_positions, cast(pending_k), cast(pending_v),
                          cast(pending_scores), pending_positions, lengths.clone())

    # ------------------------------------------------------------------------------------------ recurrent path
    def _step_loop(self, x: torch.Tensor, valid: torch.Tensor, state: BMojoState, use_cache: bool):
        """Continue from `state` one token at a time: x (B, T, D), valid (B, T)."""
        outputs = []
        for t in range(x.shape[1]):
            out, state = self.step(x[:, t], valid[:, t], state)
            outputs.append(out)
        return BMojoLayerOutput(torch.stack(outputs, dim=1), state if use_cache else None)

    def step(self, x: torch.Tensor, valid: torch.Tensor, state: BMojoState) -> tuple[torch.Tensor, BMojoState]:
        """One token per sequence: x (B, D), valid (B,) bool -> out (B, D) and the new state (pads: unchanged)."""
        B = x.shape[0]
        H, Dh, w = self.num_heads, self.head_dim, self.window_size
        dtype = state.memory.dtype
        conv_in = self._conv_inputs(x)  # (B, 3 H Dh)
        conv, conv_tails = short_conv_step(conv_in, self.conv1d.weight[:, 0], state.conv)  # (B, 3 H Dh)
        q, k, v = conv.view(B, 3, H, Dh).unbind(1)  # (B, H, Dh)
        beta, g = self._gates(x, dtype)
        memory = state.memory
        decay = torch.ones(B, H, dtype=dtype, device=x.device) if g is None else g.exp()
        prediction = decay[..., None] * torch.einsum("bhk,bhkv->bhv", ops.l2norm(k.to(dtype)), memory)
        score = self._innovation(v.to(dtype), prediction)  # (B, H)
        args = [t[:, None] for t in (q, k, v)] + [t[:, None] for t in (g, beta) if t is not None]
        o_fading, memory = get_rule(self.fading_rule).op(*args, initial_state=memory, output_final_state=True,
                                                         use_qk_l2norm=True, impl="recurrent")
        fading_k, fading_v = self._fading_tokens(o_fading[:, 0].to(x.dtype))  # (B, H, Dh)
        position = state.seen  # (B,)

        keys = [state.window_keys.to(k.dtype), k[:, :, None], fading_k[:, :, None]]
        values = [state.window_values.to(v.dtype), v[:, :, None], fading_v[:, :, None]]
        ones = torch.ones(B, H, 2, dtype=torch.bool, device=x.device)
        masks = [state.window_valid[:, None].expand(B, H, -1), ones]
        if self.eidetic_size > 0:
            old_enough = position.view(B, 1, 1) - state.store_positions >= w
            keys.insert(0, state.store_keys.to(k.dtype))
            values.insert(0, state.store_values.to(v.dtype))
            masks.insert(0, old_enough & torch.isfinite(state.store_scores))
        keys, values, mask = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, 2)
        logits = torch.einsum("bhd,bhrd->bhr", q, keys) * Dh**-0.5
        logits = logits.masked_fill(~mask, NEG_INF)
        probs = logits.to(compute_dtype(q.dtype)).softmax(-1).to(q.dtype)
        out = self.o_proj(torch.einsum("bhr,bhrd->bhd", probs, values).reshape(B, self.inner_dim))

        new_state = self._advance(state, memory, conv_tails, k, v, score, position, dtype)
        return out, new_state.where(valid, state)

    def _advance(self, state, memory, conv_tails, k, v, score, position, dtype) -> BMojoState:
        """The state after one real token: k, v (B, H, Dh); score (B, H); position (B,)."""
        B, H = score.shape
        k, v = k.to(dtype), v.to(dtype)
        window_keys = torch.cat([state.window_keys, k[:, :, None]], 2)[:, :, 1:]
        window_values = torch.cat([state.window_values, v[:, :, None]], 2)[:, :, 1:]
        window_valid = torch.cat([state.window_valid, torch.ones_like(state.window_valid[:, :1])], 1)[:, 1:]
        s = (state.store_scores, state.store_positions, state.store_keys, state.store_values)
        p = (state.pending_scores, state.pending_positions, state.pending_keys, state.pending_values)
        if self.eidetic_size > 0:
            pool = (torch.cat([p[0], score[..., None].to(dtype)], -1),
                    torch.cat([p[1], position.view(B, 1, 1).expand(B, H, 1)], -1),
                    torch.cat([p[2], k[:, :, None]], 2), torch.cat([p[3], v[:, :, None]], 2))
            p = self._merge_top(*pool, self.eidetic_per_chunk, by_position=False)
            chunk_done = ((position + 1) % self.chunk_size == 0).view(B, 1, 1)
            merged = self._merge_top(*(torch.cat([a, b], dim=-1 if a.dim() == 3 else 2) for a, b in zip(s, p)),
                                     self.eidetic_size, by_position=self.eviction == "fifo")
            s = tuple(torch.where(chunk_done.view(B, 1, 1, *([1] * (a.dim() - 3))), m, a) for m, a in zip(merged, s))
            empty = (p[0].new_full(p[0].shape, NEG_INF), torch.zeros_like(p[1]), torch.zeros_like(p[2]),
                     torch.zeros_like(p[3]))
            p = tuple(torch.where(chunk_done.view(B, 1, 1, *([1] * (a.dim() - 3))), e, a) for e, a in zip(empty, p))
        return BMojoState(memory.to(dtype), conv_tails.to(dtype), window_keys, window_values, window_valid,
                          s[2], s[3], s[0], s[1], p[2], p[3], p[0], p[1], position + 1)


# ---------------------------------------------------------------------------------------------- helpers

def _pad_time(x: torch.Tensor, pad: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 (time) of x (N, L, ...) at the end by `pad` entries."""
    if pad == 0:
        return x
    return torch.cat([x, x.new_full((x.shape[0], pad) + tuple(x.shape[2:]), value)], dim=1)


def _gather_tokens(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
    """Keys and values of k, v (N, H, L, Dh) at positions (N, H, X) int64 -> (N, H, X, Dh) each."""
    index = positions[..., None].expand(*positions.shape, k.shape[-1])
    return k.gather(2, index), v.gather(2, index)


def check_bmojo_args(*, hidden_size, num_heads, head_dim, fading_rule, window_size, chunk_size, eidetic_size,
                     eidetic_per_chunk, eviction, conv_size) -> None:
    """Raise ValueError naming the first bad B'MOJO argument and its allowed values."""
    for name, value, minimum in (("hidden_size", hidden_size, 1), ("num_heads", num_heads, 1),
                                 ("head_dim", head_dim, 1), ("window_size", window_size, 1),
                                 ("chunk_size", chunk_size, 1), ("eidetic_size", eidetic_size, 0),
                                 ("eidetic_per_chunk", eidetic_per_chunk, 0), ("conv_size", conv_size, 2)):
        if not is_int(value) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if fading_rule not in FADING_RULES:
        raise ValueError(f"fading_rule must be one of {FADING_RULES}, got {fading_rule!r}")
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
    if eidetic_per_chunk > chunk_size:
        raise ValueError(f"eidetic_per_chunk must be in [0, chunk_size={chunk_size}], got {eidetic_per_chunk}")
    if eidetic_size > 0 and eidetic_per_chunk == 0:
        raise ValueError("eidetic_per_chunk must be >= 1 when eidetic_size > 0 (or set eidetic_size=0)")
