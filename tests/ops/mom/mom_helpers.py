"""Random arguments of the MoM mixer op (memmix.ops.mom.mom_mixer) for its tests."""
from __future__ import annotations

import math
import torch

from memmix.ops.mom import MoMWeights
from memmix.ops.registry import get_rule

WEIGHT_NAMES = ("q_proj", "kv_proj", "conv", "A_log", "dt_bias")


def make_weights(rule: str = "gated_delta", *, D: int = 16, H: int = 2, K: int = 4, V: int = 4, M: int = 4,
                 shared: bool = True, single_kv: bool = False, W: int = 4, dtype=torch.float64, seed: int = 0,
                 requires_grad: bool = False) -> MoMWeights:
    """Weights with activations of order one: projections ~ N(0, 1/D), conv taps ~ N(0, 1/W), decay rates
    A in (1, 16) and dt_bias around softplus^-1(0.01..0.1), as the layer initialises them."""
    record = get_rule(rule)
    gen = torch.Generator().manual_seed(seed)
    rows = 1 if single_kv else M + int(shared)
    gates = H * (int(record.uses_beta) + int(record.uses_gate))

    def randn(*shape, scale):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    dt = torch.exp(torch.rand(H, generator=gen, dtype=torch.float64) * math.log(10) + math.log(0.01))  # 0.01..0.1
    tensors = dict(q_proj=randn(H * K, D, scale=D**-0.5), kv_proj=randn(rows, H * K + H * V + gates, D, scale=D**-0.5),
                   conv=randn(2 * H * K + H * V, W, scale=W**-0.5),
                   A_log=torch.empty(H, dtype=torch.float64).uniform_(1, 16, generator=gen).log(),
                   dt_bias=dt + torch.log(-torch.expm1(-dt)))
    return MoMWeights(**{name: x.to(dtype).requires_grad_(requires_grad) for name, x in tensors.items()})


def make_routing(B: int, T: int, M: int, k: int, *, dtype=torch.float64, seed: int = 0,
                 requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, k) distinct random picks among M memories and their weights (positive, summing to 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(B, T, M, generator=gen).topk(k, dim=-1).indices
    weights = torch.randn(B, T, k, generator=gen, dtype=torch.float64).softmax(-1)
    return ids, weights.to(dtype).requires_grad_(requires_grad)


def make_state(N: int, weights: MoMWeights, H: int, M: int, shared: bool, *, seed: int = 0,
               dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A random incoming state: memory (N, P, H, K, V) of order one, conv tails (N, P, W-1, C) of order one."""
    gen = torch.Generator().manual_seed(seed)
    Kd = weights.q_proj.shape[0]
    C, W = weights.conv.shape
    P = M + int(shared)
    memory = torch.randn(N, P, H, Kd // H, (C - 2 * Kd) // H, generator=gen, dtype=torch.float64)
    conv = torch.randn(N, P, W - 1, C, generator=gen, dtype=torch.float64)
    return memory.to(dtype), conv.to(dtype)


def padding_mask(B: int, T: int) -> torch.Tensor:
    """(B, T) bool: row 0 left-padded by a third, row 1 right-padded by a quarter, row 2 with holes at 3 and T-2."""
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, : T // 3] = False
    if B > 1:
        valid[1, T - T // 4:] = False
    if B > 2:
        valid[2, [3 % T, T - 2]] = False
    return valid
