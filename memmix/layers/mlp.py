"""SwiGLU feed-forward block used after every mixing layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_intermediate_size(hidden_size: int, hidden_ratio: float = 4, multiple_of: int = 256) -> int:
    """fla's GatedMLP default: int(hidden_size * hidden_ratio * 2 / 3) rounded up to a multiple of `multiple_of`.

    Keeping the same rule makes checkpoints converted from flash-linear-attention line up without setting
    `intermediate_size` by hand.
    """
    size = int(hidden_size * hidden_ratio * 2 / 3)
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


class SwiGLUMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); no biases.

    Parameters: gate_proj.weight (I, D), up_proj.weight (I, D), down_proj.weight (D, I).
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (..., D) -> (..., D)."""
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
