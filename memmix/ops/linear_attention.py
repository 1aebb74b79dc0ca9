"""Linear attention rules: gated (GLA with a scalar decay per head and token) and plain, as a step loop
and in chunkwise-parallel form (PyTorch only: no chunked Triton kernel).

Per head, with state S in R^{K x V} and q already scaled:
    S = exp(g_t) S + k_t v_t^T;  o_t = S^T q_t.
Plain linear attention is the gated rule with g = 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from memmix.checks import check_log_decay
from memmix.ops.common import (CHUNK_SIZE, causal_decay, chunk_log_decay, cpu_rows, fit_chunk_size, merge_chunks,
                               run_rule, split_chunks)
from memmix.ops.registry import MemoryRule, register_rule


def recurrent_gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                                     beta: None, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference step loop, one token at a time.

    q, k: (N, L, H, K) (q scaled); v: (N, L, H, V); g: (N, L, H) log decay or None; beta: unused (None);
    state: (N, H, K, V). Returns o (N, L, H, V) and the final state (N, H, K, V), in state's dtype.
    """
    outputs = []
    for t in range(q.shape[1]):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]  # (N, H, K), (N, H, K), (N, H, V)
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        state = state + k_t[..., :, None] * v_t[..., None, :]  # (N, H, K, V)
        outputs.append(torch.einsum("nhk,nhkv->nhv", q_t, state))
    return torch.stack(outputs, dim=1), state


def chunk_gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                                 beta: None, state: torch.Tensor,
                                 chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form: causal decayed attention inside chunks, one state pass across chunks.

    Same arguments and results as recurrent_gated_linear_attention. With cumulative log decay b inside a
    chunk and incoming state S:  o_i = exp(b_i) S^T q_i + sum_{j<=i} exp(b_i - b_j) (q_i.k_j) v_j.
    """
    L = q.shape[1]
    chunk_size = fit_chunk_size(chunk_size, L, cpu_rows(q))
    q, k, v = (split_chunks(x, chunk_size) for x in (q, k, v))  # (N, H, NC, C, K|V)
    b = chunk_log_decay(g, q, chunk_size)  # (N, H, NC, C)
    o_intra = ((q @ k.mT) * causal_decay(b)) @ v  # (N, H, NC, C, V)
    kv = (k * (b[..., -1:] - b).exp()[..., None]).mT @ v  # (N, H, NC, K, V), each chunk's own contribution
    chunk_decay = b[..., -1].exp()[..., None, None]  # (N, H, NC, 1, 1)

    states = []
    for c in range(q.shape[2]):
        states.append(state)
        state = chunk_decay[:, :, c] * state + kv[:, :, c]
    states = torch.stack(states, dim=2)  # (N, H, NC, K, V), state entering each chunk
    o = o_intra + (q * b.exp()[..., None]) @ states
    return merge_chunks(o, L), state


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                           scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                           output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                           use_qk_l2norm: bool = False, low_memory: bool = False, impl: str = "auto"):
    """Gated linear attention (scalar decay per head and token): S = exp(g) S + k v^T; o = S^T (scale q).

    q, k: (B, T, H, K); v: (B, T, H, V); g: (B, T, H) log decay (<= 0);
    scale: defaults to K ** -0.5; initial_state: (N, H, K, V) or None (zeros);
    cu_seqlens: int (N + 1,) boundaries of N sequences packed along T (then B == 1), else N = B;
    use_qk_l2norm: L2-normalise q and k over K first (inside the op, differentiable);
    low_memory: taken for the rules' common signature and ignored (these rules have no chunked Triton kernel);
    impl: "recurrent" (step loop), "chunk" (chunkwise-parallel) or "auto" (CUDA: chunk; CPU: recurrent for T <= 8
    else chunk); "triton" raises, there is no chunked kernel for these rules (decoding steps have one:
    memmix.ops.memory_step).
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) (float32, float64 for float64
    inputs) when output_final_state, else None.
    """
    check_log_decay(g, q)
    return run_rule("gated_linear_attention", q, k, v, g, None, scale=scale,
                    initial_state=initial_state, output_final_state=output_final_state,
                    cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, low_memory=low_memory, impl=impl)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                     output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                     use_qk_l2norm: bool = False, low_memory: bool = False, impl: str = "auto"):
    """Linear attention: S = S + k v^T; o = S^T (scale q). gated_linear_attention with g = 0.

    Arguments and results as gated_linear_attention, without g.
    """
    return run_rule("linear_attention", q, k, v, None, None, scale=scale,
                    initial_state=initial_state, output_final_state=output_final_state,
                    cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, low_memory=low_memory, impl=impl)


register_rule(MemoryRule("gated_linear_attention", "gla", uses_gate=True, uses_beta=False,
                          op=gated_linear_attention, recurrent=recurrent_gated_linear_attention,
                          chunk=chunk_gated_linear_attention))
register_rule(MemoryRule("linear_attention", "linear", uses_gate=False, uses_beta=False, op=linear_attention,
                          recurrent=recurrent_gated_linear_attention, chunk=chunk_gated_linear_attention))
