"""AdamW with weight-decay groups, and a warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

# Parameters whose names end like this never decay, even when a wrapper (FSDP2) drops the
# `_no_weight_decay` attribute that the layer put on them.
_NO_DECAY_SUFFIXES = ("A_log", "dt_bias", "bias")


def _embedding_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}


def _norm_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower():
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def split_decay_groups(model: nn.Module, decay_embeddings: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (decay, no_decay) lists.

    No decay: biases and every other parameter with fewer than 2 dims, norm weights, parameters flagged
    `_no_weight_decay = True` (A_log, dt_bias), and embeddings unless `decay_embeddings`.
    Tied parameters appear once.
    """
    skip = _norm_param_ids(model)
    if not decay_embeddings:
        skip |= _embedding_param_ids(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # named_parameters() de-duplicates tied weights
        if not param.requires_grad:
            continue
        flagged = getattr(param, "_no_weight_decay", False) or name.endswith(_NO_DECAY_SUFFIXES)
        if flagged or param.ndim < 2 or id(param) in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return decay, no_decay


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_embeddings: bool = False,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over two groups: weight decay on matrices, none on biases/norms/embeddings/`_no_weight_decay`.

    fused: torch's fused AdamW kernel (one launch for every parameter); None = when every parameter is a plain
    CUDA tensor (FSDP2's DTensors and CPU parameters take torch's default)."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = split_decay_groups(model, decay_embeddings)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = all(p.is_cuda and type(p.data) is torch.Tensor for p in params)
    # fused/foreach kernels can't mix DTensor and plain tensors on every torch version: there torch chooses
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {}))


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the base lr over `warmup_steps`, then cosine decay to `min_lr_ratio * lr`
    at `total_steps` (held there afterwards)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
