"""Helpers shared by the memory-rule op tests: random inputs, a uniform call, relative error."""
from __future__ import annotations

from typing import Optional

import torch

from memmix.ops import delta_rule, gated_delta_rule, gated_linear_attention, linear_attention

# name -> (function, takes g, takes beta)
RULES = {
    "gated_delta_rule": (gated_delta_rule, True, True),
    "delta_rule": (delta_rule, False, True),
    "gated_linear_attention": (gated_linear_attention, True, False),
    "linear_attention": (linear_attention, False, False),
}
INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (in float64; 0/0 counts as 0)."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).norm().item()
    ref = expected.norm().item()
    return diff / ref if ref > 0 else diff


def make_inputs(rule: str, *, B: int = 2, T: int = 16, H: int = 2, K: int = 8, V: int = 6,
                lengths: Optional[list[int]] = None, initial_state: bool = True,
                dtype: torch.dtype = torch.float64, seed: int = 0, requires_grad: bool = False) -> dict:
    """Random inputs for `rule`: keys from INPUT_NAMES (those the rule takes) plus cu_seqlens.

    lengths: packed varlen batch (B = 1, T = sum(lengths)). Keys have norm ~1 so that the delta rules
    stay contractive even without use_qk_l2norm.
    """
    _, takes_g, takes_beta = RULES[rule]
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
    fn, takes_g, takes_beta = RULES[rule]
    args = [inputs["q"], inputs["k"], inputs["v"]]
    args += [inputs["g"]] if takes_g else []
    args += [inputs["beta"]] if takes_beta else []
    return fn(*args, initial_state=inputs.get("initial_state"), cu_seqlens=inputs.get("cu_seqlens"), **kwargs)


def grad_inputs(inputs: dict) -> list[str]:
    """Names of the differentiable tensors present in `inputs`, in INPUT_NAMES order."""
    return [name for name in INPUT_NAMES if inputs.get(name) is not None]
