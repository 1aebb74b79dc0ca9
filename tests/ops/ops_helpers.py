"""Helpers shared by the memory-rule op tests: random inputs and a uniform call."""
from __future__ import annotations

from typing import Optional

import torch

from memmix.ops.registry import rules

RULES = {rule.name: rule for rule in rules()}  # name -> its registry record
INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(rule: str, *, B: int = 2, T: int = 16, H: int = 2, K: int = 8, V: int = 6,
                lengths: Optional[list[int]] = None, initial_state: bool = True,
                dtype: torch.dtype = torch.float64, seed: int = 0, requires_grad: bool = False) -> dict:
    """Random inputs for `rule`: keys from INPUT_NAMES (those the rule takes) plus cu_seqlens.

    lengths: packed varlen batch (B = 1, T = sum(lengths)). Keys have norm ~1 so that the delta rules
    stay contractive even without use_qk_l2norm.
    """
    takes_g, takes_beta = RULES[rule].uses_gate, RULES[rule].uses_beta
    gen = torch.Generator().manual_seed(seed)
    if lengths is not None:
        B, T = 1, sum(lengths)
    num_seqs = B if lengths is None else len(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {"q": rand(B, T, H, K), "k": rand(B, T, H, K) * K ** -0.5, "v": rand(B, T, H, V)}
    if takes_g:
        # log decay in [-1, -0.01]: strong enough to matter, weak enough to keep information across a chunk
        inputs["g"] = -(0.01 + 0.99 * torch.rand(B, T, H, generator=gen, dtype=torch.float64))
    if takes_beta:
        inputs["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if initial_state:
        inputs["initial_state"] = rand(num_seqs, H, K, V)
    inputs = {name: x.to(dtype).requires_grad_(requires_grad) for name, x in inputs.items()}
    inputs["cu_seqlens"] = (None if lengths is None else
                            torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0))
    return inputs


def call(rule: str, inputs: dict, **kwargs):
    """Run `rule` on make_inputs-style `inputs`; kwargs are the op's keywords (impl, scale, ...)."""
    record = RULES[rule]
    args = [inputs["q"], inputs["k"], inputs["v"]]
    args += [inputs["g"]] if record.uses_gate else []
    args += [inputs["beta"]] if record.uses_beta else []
    return record.op(*args, initial_state=inputs.get("initial_state"), cu_seqlens=inputs.get("cu_seqlens"), **kwargs)


def grad_inputs(inputs: dict) -> list[str]:
    """Names of the differentiable tensors present in `inputs`, in INPUT_NAMES order."""
    return [name for name in INPUT_NAMES if inputs.get(name) is not None]


def make_step_inputs(rule: str, *, N: int = 6, H: int = 2, K: int = 8, V: int = 6, slots: int = 10,
                     dtype: torch.dtype = torch.float64, bank_dtype: torch.dtype = torch.float64, seed: int = 0,
                     device: str = "cpu") -> dict:
    """Random arguments of memmix.ops.memory_step: q, k (N, H, K), v (N, H, V), g, beta (N, H) or None (as the
    rule takes them), bank (slots, H, K, V), index (N,) distinct int64 rows, keep (N,) with every third False."""
    takes_g, takes_beta = RULES[rule].uses_gate, RULES[rule].uses_beta
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {"q": rand(N, H, K).to(dtype), "k": rand(N, H, K).to(dtype), "v": rand(N, H, V).to(dtype),
              "g": -(0.01 + 0.99 * torch.rand(N, H, generator=gen, dtype=torch.float64)) if takes_g else None,
              "beta": torch.rand(N, H, generator=gen, dtype=torch.float64) if takes_beta else None,
              "bank": rand(slots, H, K, V).to(bank_dtype),
              "index": torch.randperm(slots, generator=gen)[:N],
              "keep": torch.arange(N) % 3 != 1}
    return {name: None if x is None else x.to(device) for name, x in inputs.items()}


def naive_memory_step(rule: str, q, k, v, g, beta, bank, index, keep, scale=None):
    """One step per (slot, head), written from the rules' formulas, in float64; returns o (N, H, V) and a new bank.

    q, k L2-normalised (eps 1e-6 inside the root); S = exp(g) S; u = beta (v - S^T k) (delta rules) or v;
    S = S + k u^T; o = S^T (scale q); bank[index[n]] = S only where keep[n].
    """
    q, k, v, bank = q.double(), k.double(), v.double(), bank.double().clone()
    N, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    o = torch.zeros(N, H, v.shape[-1], dtype=torch.float64, device=q.device)
    for n in range(N):
        for h in range(H):
            S = bank[index[n], h].clone()  # (K, V)
            q_nh = q[n, h] / torch.sqrt(q[n, h] @ q[n, h] + 1e-6) * scale
            k_nh = k[n, h] / torch.sqrt(k[n, h] @ k[n, h] + 1e-6)
            if g is not None:
                S = S * torch.exp(g[n, h].double())
            u = v[n, h] if beta is None else beta[n, h].double() * (v[n, h] - S.T @ k_nh)
            S = S + torch.outer(k_nh, u)
            o[n, h] = S.T @ q_nh
            if keep[n]:
                bank[index[n], h] = S
    return o, bank
