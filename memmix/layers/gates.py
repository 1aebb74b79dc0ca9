"""The decay gate's parameters of the gated memory rules (the gate itself: memmix.ops.common.log_decay)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def init_decay_parameters(A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    """In place, as the gated delta rule's reference: decay rates A uniform in (1, 16) (A_log = log A) and step
    sizes dt log-uniform in [1e-3, 0.1] (dt_bias = softplus^-1(dt)). A_log, dt_bias: (H,)."""
    A_log.copy_(torch.empty_like(A_log).uniform_(1, 16).log())
    dt = torch.exp(torch.rand_like(dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
