"""Delta rules: gated (Gated DeltaNet) and plain (DeltaNet), as a step loop and in chunkwise-parallel form.

Per head, with state S in R^{K x V} and q already scaled:
    S = exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S = S + k_t u_t^T;  o_t = S^T q_t.
The plain delta rule is the gated one with g = 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from memmix.checks import check_log_decay
from memmix.ops.common import (CHUNK_SIZE, causal_decay, chunk_log_decay, cpu_rows, fit_chunk_size, merge_chunks,
                               run_rule, split_chunks)
from memmix.ops.registry import MemoryRule, register_rule


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                               beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference step loop, one token at a time.

    q, k: (N, L, H, K) (q scaled); v: (N, L, H, V); g: (N, L, H) log decay or None; beta: (N, L, H);
    state: (N, H, K, V). Returns o (N, L, H, V) and the final state (N, H, K, V), in state's dtype.
    """
    outputs = []
    for t in range(q.shape[1]):
        q_t, k_t, v_t, beta_t = q[:, t], k[:, t], v[:, t], beta[:, t]  # (N, H, K), (N, H, V), (N, H)
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        v_old = torch.einsum("nhk,nhkv->nhv", k_t, state)  # what the memory recalls for k_t
        u_t = beta_t[..., None] * (v_t - v_old)  # (N, H, V)
        state = state + k_t[..., :, None] * u_t[..., None, :]  # (N, H, K, V)
        outputs.append(torch.einsum("nhk,nhkv->nhv", q_t, state))
    return torch.stack(outputs, dim=1), state


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                           beta: torch.Tensor, state: torch.Tensor,
                           chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form (UT transform inside chunks, one state pass across chunks).

    Same arguments and results as recurrent_gated_delta_rule. Inside a chunk with cumulative log decay
    b and incoming state S, the updates u solve the unit lower-triangular system
        (I + strict_lower(beta_i exp(b_i - b_j) k_i.k_j)) u = beta v - beta exp(b) K S,
    so u = u_base - w S, with w and u_base from one batched triangular solve over all chunks.
    """
    L, K = q.shape[1], q.shape[-1]
    chunk_size = fit_chunk_size(chunk_size, L, cpu_rows(q))
    q, k, v = (split_chunks(x, chunk_size) for x in (q, k, v))  # (N, H, NC, C, K|V)
    beta = split_chunks(beta, chunk_size)  # (N, H, NC, C)
    b = chunk_log_decay(g, q, chunk_size)  # (N, H, NC, C)
    decay = causal_decay(b)  # (N, H, NC, C, C)

    A = (beta[..., :, None] * (k @ k.mT) * decay).tril(-1)  # (N, H, NC, C, C)
    rhs = torch.cat([k * (beta * b.exp())[..., None], v * beta[..., None]], dim=-1)  # (N, H, NC, C, K+V)
    solved = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    w, u_base = solved.split([K, v.shape[-1]], dim=-1)  # (N, H, NC, C, K), (N, H, NC, C, V)
    attn = (q @ k.mT) * decay  # (N, H, NC, C, C)
    k_to_end = k * (b[..., -1:] - b).exp()[..., None]  # k_j decayed to the chunk's end
    chunk_decay = b[..., -1].exp()[..., None, None]  # (N, H, NC, 1, 1)

    states, updates = [], []
    for c in range(q.shape[2]):
        u = u_base[:, :, c] - w[:, :, c] @ state  # (N, H, C, V)
        states.append(state)
        updates.append(u)
        state = chunk_decay[:, :, c] * state + k_to_end[:, :, c].mT @ u
    states = torch.stack(states, dim=2)  # (N, H, NC, K, V), state entering each chunk
    updates = torch.stack(updates, dim=2)  # (N, H, NC, C, V)
    o = (q * b.exp()[..., None]) @ states + attn @ updates  # (N, H, NC, C, V)
    return merge_chunks(o, L), state


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                     scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                     output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                     use_qk_l2norm: bool = False, low_memory: bool = False, impl: str = "auto"):
    """Gated delta rule: S = exp(g) S; S = S + beta k (v - S^T k)^T; o = S^T (scale q).

    q, k: (B, T, H, K); v: (B, T, H, V); g: (B, T, H) log decay (<= 0); beta: (B, T, H) in [0, 1];
    scale: defaults to K ** -0.5; initial_state: (N, H, K, V) or None (zeros);
    cu_seqlens: int (N + 1,) boundaries of N sequences packed along T (then B == 1), else N = B;
    use_qk_l2norm: L2-normalise q and k over K first (inside the op, differentiable);
    low_memory: the Triton kernel runs one head at a time, forward and backward (least memory, more time); the
    PyTorch forms ignore it;
    impl: "recurrent" (step loop), "chunk" (chunkwise-parallel), "triton" (the CUDA kernel memmix.ops.triton
    registers) or "auto" (CUDA: triton when registered else chunk; CPU: recurrent for T <= 8 else chunk).
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) (float32, float64 for float64
    inputs) when output_final_state, else None.
    """
    check_log_decay(g, q)
    return run_rule("gated_delta_rule", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                    use_qk_l2norm=use_qk_l2norm, low_memory=low_memory, impl=impl)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
               scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
               output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
               use_qk_l2norm: bool = False, low_memory: bool = False, impl: str = "auto"):
    """Delta rule (DeltaNet): S = S + beta k (v - S^T k)^T; o = S^T (scale q). gated_delta_rule with g = 0.

    Arguments and results as gated_delta_rule, without g.
    """
    return run_rule("delta_rule", q, k, v, None, beta, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                    use_qk_l2norm=use_qk_l2norm, low_memory=low_memory, impl=impl)


register_rule(MemoryRule("gated_delta_rule", "gated_delta", uses_gate=True, uses_beta=True, op=gated_delta_rule,
                          recurrent=recurrent_gated_delta_rule, chunk=chunk_gated_delta_rule))
register_rule(MemoryRule("delta_rule", "delta", uses_gate=False, uses_beta=True, op=delta_rule,
                          recurrent=recurrent_gated_delta_rule, chunk=chunk_gated_delta_rule))
