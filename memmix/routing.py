"""What a MoM layer learns about routing: the top-k router (with a temperature), the load-balancing loss, the router
z-loss, modality groups.

Where the routed tokens then go (slots, segments, the dispatch plan) is the mixer op's business:
memmix.ops.mom.plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AUX_LOSS_MODES = ("global", "layerwise")


@dataclass
class RoutingDecision:
    """The router's choice per token: logits (B, T, M) float32, the softmax's input (the gate's logits divided by
    the temperature); weights (B, T, k) float32 summing to 1; indices (B, T, k) int64 memory ids."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


def route(router_logits: torch.Tensor, topk: int, allowed: torch.Tensor | None = None,
          temperature: float = 1.0) -> RoutingDecision:
    """Softmax in float32 over memories of router_logits / temperature, keep the top-k, renormalise over the picks.

    router_logits: (B, T, M) in any float dtype.
    allowed: (B, T, M) bool or None: each token picks only among its allowed memories (modality groups);
    the softmax then runs over the allowed memories alone.
    temperature: > 0; above 1 flattens the routing weights, below 1 sharpens them (the picks are the same: dividing
    by a positive number keeps the order). The returned logits are the tempered ones, so the load-balancing loss and
    the z-loss, which read them, see the probabilities that route.
    """
    logits = router_logits.float()
    if temperature != 1.0:  # a Python float: no kernel (and the default's bits) when it is 1
        logits = logits / temperature
    masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
    scores = masked.softmax(dim=-1)
    weights, indices = scores.topk(topk, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return RoutingDecision(logits=logits, weights=weights, indices=indices)


def group_of_memory(memory_groups: list[int] | tuple[int, ...], device=None) -> torch.Tensor:
    """(M,) int64 modality group of each memory, from the group sizes (e.g. [4, 2] -> [0,0,0,0,1,1])."""
    sizes = torch.tensor(list(memory_groups), device=device)
    return torch.repeat_interleave(torch.arange(len(memory_groups), device=device), sizes)


def allowed_memories(modality_ids: torch.Tensor, memory_groups: list[int] | tuple[int, ...]) -> torch.Tensor:
    """(B, T, M) bool: memory m is open to a token iff m belongs to the token's modality group.

    modality_ids: (B, T) int64 in [0, len(memory_groups)).
    """
    return group_of_memory(memory_groups, modality_ids.device) == modality_ids.unsqueeze(-1)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor] | torch.Tensor,
    num_memories: int,
    topk: int,
    attention_mask: torch.Tensor | None = None,
    mode: str = "global",
    memory_groups: list[int] | tuple[int, ...] | None = None,
    modality_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss: num_memories * sum_m f_m * P_m (1.0 when perfectly balanced
    with k = 1; k when balanced with top-k).

    f_m: fraction of (token, pick) assignments that go to memory m (per pick rank, as the reference);
    P_m: mean router probability of memory m. Padded tokens (attention_mask == 0) are left out.
    router_logits: one (B, T, M) tensor per layer (tuple/list) or a single tensor.
    attention_mask: (B, T_total) 0/1; its last T columns are used.
    mode: "global" pools all layers' tokens (as the reference); "layerwise" averages per-layer losses.
    memory_groups / modality_ids (B, T): with modality groups, each group is balanced over its own memories
    and its own tokens, and the groups' losses are averaged over the groups present.
    Returns a 0-d float32 tensor.
    """
    if memory_groups is not None:
        return _grouped_balance(router_logits, topk, attention_mask, mode, memory_groups, modality_ids)
    if mode not in AUX_LOSS_MODES:
        raise ValueError(f"mode must be one of {AUX_LOSS_MODES}, got {mode!r}")
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits must hold at least one layer's logits")
    masks = [_token_mask(logits, attention_mask) for logits in layers]
    if mode == "layerwise":
        losses = [_balance(lg, mk, num_memories, topk) for lg, mk in zip(layers, masks)]
        return torch.stack(losses).mean()
    logits = torch.cat([lg.reshape(-1, lg.shape[-1]) for lg in layers])
    mask = torch.cat([mk.reshape(-1) for mk in masks])
    return _balance(logits, mask, num_memories, topk)


def router_z_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mode: str = "global",
    memory_groups: list[int] | tuple[int, ...] | None = None,
    modality_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): the mean over real tokens of logsumexp(logits)^2, which keeps the
    router's logits small.

    router_logits: one (B, T, M) tensor per layer (tuple/list) or a single tensor: the router softmax's input.
    attention_mask: (B, T_total) 0/1; its last T columns are used (padded tokens are left out).
    mode: pooled over layers as the load-balancing loss: "global" pools all layers' tokens, "layerwise" averages
    the per-layer means (the same number here, since every layer sees the same tokens).
    memory_groups / modality_ids (B, T): with modality groups a token's softmax runs over its group's memories only,
    so its logsumexp does too.
    Returns a 0-d float32 tensor.
    """
    if mode not in AUX_LOSS_MODES:
        raise ValueError(f"mode must be one of {AUX_LOSS_MODES}, got {mode!r}")
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits must hold at least one layer's logits")
    allowed = None
    if memory_groups is not None:
        if modality_ids is None:
            modality_ids = torch.zeros(layers[0].shape[:2], dtype=torch.long, device=layers[0].device)
        allowed = allowed_memories(modality_ids[:, -layers[0].shape[1]:], memory_groups)
    squares, masks = [], []
    for logits in layers:
        logits = logits.float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        squares.append(logits.logsumexp(dim=-1).square())  # (B, T)
        masks.append(_token_mask(logits, attention_mask))
    if mode == "layerwise":
        return torch.stack([_masked_mean(z, m) for z, m in zip(squares, masks)]).mean()
    return _masked_mean(torch.cat([z.reshape(-1) for z in squares]), torch.cat([m.reshape(-1) for m in masks]))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over mask == 1 (0 when no token is real); same shapes, float32."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _grouped_balance(router_logits, topk, attention_mask, mode, memory_groups, modality_ids) -> torch.Tensor:
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if modality_ids is None:
        modality_ids = torch.zeros(layers[0].shape[:2], dtype=torch.long, device=layers[0].device)
    T = layers[0].shape[1]
    modality_ids = modality_ids[:, -T:]
    token_mask = _token_mask(layers[0], attention_mask)
    losses, present = [], []
    start = 0
    for group, size in enumerate(memory_groups):
        in_group = token_mask * (modality_ids == group).float()
        sub = [lg[..., start : start + size] for lg in layers]
        losses.append(load_balancing_loss(sub, size, min(topk, size), in_group, mode))
        present.append((in_group.sum() > 0).float())
        start += size
    present = torch.stack(present)
    return (torch.stack(losses) * present).sum() / present.sum().clamp(min=1.0)


def _token_mask(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) float mask of real tokens for logits (B, T, M)."""
    if attention_mask is None:
        return logits.new_ones(logits.shape[:-1], dtype=torch.float32)
    return attention_mask[:, -logits.shape[1]:].to(torch.float32)


def one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """F.one_hot's result without its range check, which reads the index back to the host on the CPU:
    index (...) int64 in [0, num_classes) -> (..., num_classes) of dtype."""
    out = torch.zeros(*index.shape, num_classes, dtype=dtype, device=index.device)
    return out.scatter_(-1, index.unsqueeze(-1), 1)


def _balance(logits: torch.Tensor, mask: torch.Tensor, num_memories: int, topk: int) -> torch.Tensor:
    probs = logits.float().reshape(-1, logits.shape[-1]).softmax(dim=-1)  # (N, M)
    mask = mask.reshape(-1, 1)  # (N, 1)
    picks = one_hot(probs.topk(topk, dim=-1).indices, num_memories, torch.float32)  # (N, k, M)
    denom = mask.sum().clamp(min=1.0)
    fraction = (picks * mask.unsqueeze(-1)).sum(0) / denom  # (k, M)
    mean_prob = (probs * mask).sum(0) / denom  # (M,)
    return (fraction * mean_prob).sum() * num_memories
