"""The decay gate's parameters of the gated memory rules (the gate itself: memmix.ops.common.log_decay)."""
from __future__ import annotations

import math

import torch
from torch import nn


def decay_parameters(num_heads: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(A_log, dt_bias), each (H,), left for init_decay_parameters to fill and kept out of weight decay
    (memmix.training.optim reads `_no_weight_decay`)."""
    A_log, dt_bias = nn.Parameter(torch.empty(num_heads)), nn.Parameter(torch.empty(num_heads))
    A_log._no_weight_decay = dt_bias._no_weight_decay = True
    return A_log, dt_bias


def head_gate_projections(hidden_size: int, num_heads: int, uses_beta: bool, uses_decay: bool):
    """A single-memory layer's per-head gates: (b_proj, a_proj, A_log, dt_bias), the beta projection D -> H when
    the rule uses beta, the decay projection D -> H and decay_parameters when it decays, else None."""
    b_proj = nn.Linear(hidden_size, num_heads, bias=False) if uses_beta else None
    if not uses_decay:
        return b_proj, None, None, None
    return (b_proj, nn.Linear(hidden_size, num_heads, bias=False)) + decay_parameters(num_heads)


@torch.no_grad()
def init_decay_parameters(A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    """In place, as the gated delta rule's reference: decay rates A uniform in (1, 16) (A_log = log A) and step
    sizes dt log-uniform in [1e-3, 0.1] (dt_bias = softplus^-1(dt)). A_log, dt_bias: (H,)."""
    A_log.copy_(torch.empty_like(A_log).uniform_(1, 16).log())
    dt = torch.exp(torch.rand_like(dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
