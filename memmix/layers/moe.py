"""Modality-aware mixture-of-experts feed-forward block (MoMa, Lin et al., arXiv 2407.21770).

Experts are split into modality groups (e.g. 4 text experts, 4 image experts); a token is only ever routed
among its own modality's experts. Two routings:
- "token_choice": each token picks its top-k experts of its group (softmax over the group, renormalised).
- "expert_choice": each expert picks its top-C tokens of its own modality (C from the capacity factor),
  weighted by the token's softmax score over the group. This looks at the whole batch, so it is not
  causal; a small auxiliary router per group learns (binary cross-entropy on detached inputs) to predict
  which experts would pick a token, and replaces expert choice when `causal=True` (inference), where each
  token's experts depend on that token alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memmix.checks import is_int
from memmix.routing import allowed_memories

FFN_ROUTINGS = ("token_choice", "expert_choice")


@dataclass
class MoEOutput:
    hidden_states: torch.Tensor  # (B, T, D)
    router_logits: torch.Tensor  # (B, T, E) float32
    aux_router_loss: torch.Tensor | None  # 0-d: auxiliary-router BCE (expert choice, training only)


class ModalityMoE(nn.Module):
    """SwiGLU experts in modality groups. Input/output (B, T, hidden_size); modality_ids (B, T) in [0, G)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        expert_groups: list[int],
        routing: str = "token_choice",
        topk: int = 1,
        capacity_factor: float = 1.0,
        aux_router_hidden: int = 64,
    ):
        super().__init__()
        if routing not in FFN_ROUTINGS:
            raise ValueError(f"routing must be one of {FFN_ROUTINGS}, got {routing!r}")
        if not expert_groups or any(not is_int(n) or n < 1 for n in expert_groups):
            raise ValueError(f"expert_groups must be a non-empty list of positive expert counts, got {expert_groups!r}")
        if not 1 <= topk <= min(expert_groups):
            raise ValueError(f"topk must be in [1, smallest expert group={min(expert_groups)}], got {topk!r}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
        self.expert_groups = list(expert_groups)
        self.num_experts = sum(expert_groups)
        self.routing = routing
        self.topk = topk
        self.capacity_factor = capacity_factor
        E, D, Fd = self.num_experts, hidden_size, intermediate_size
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, Fd, D))
        self.w_up = nn.Parameter(torch.empty(E, Fd, D))
        self.w_down = nn.Parameter(torch.empty(E, D, Fd))
        self.aux_router = None
        if routing == "expert_choice":
            self.aux_router = nn.Sequential(nn.Linear(D, aux_router_hidden), nn.SiLU(), nn.Linear(aux_router_hidden, E))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            for row in w.data:
                nn.init.xavier_uniform_(row)
        nn.init.normal_(self.router.weight, std=0.02)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None, attention_mask=None,
                causal: bool | None = None) -> MoEOutput:
        """x (B, T, D); modality_ids (B, >= T) int64 (default all 0); attention_mask (B, >= T) 0/1;
        causal: use the auxiliary router instead of expert choice (default: not self.training)."""
        B, T, D = x.shape
        modality_ids = torch.zeros(B, T, dtype=torch.long, device=x.device) if modality_ids is None else modality_ids[:, -T:]
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask[:, -T:].bool()
        allowed = allowed_memories(modality_ids.long(), self.expert_groups) & valid.unsqueeze(-1)  # (B, T, E)
        logits = self.router(x).float()
        scores = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # (B, T, E)
        aux_loss = None
        if self.routing == "token_choice":
            weights = _top_k_weights(scores, self.topk)
        else:
            causal = (not self.training) if causal is None else causal
            if causal:
                weights = self._aux_router_weights(x, scores, allowed)
            else:
                weights = self._expert_choice_weights(scores, allowed, modality_ids)
                if self.training:
                    aux_loss = self._aux_router_loss(x, weights, allowed)
        out = self._run_experts(x.reshape(B * T, D), weights.reshape(B * T, -1))
        return MoEOutput(out.view(B, T, D), logits, aux_loss)

    def _expert_choice_weights(self, scores, allowed, modality_ids) -> torch.Tensor:
        """Each expert keeps the top-C tokens of its modality: (B, T, E) score where picked, else 0.

        C = ceil(capacity_factor * topk * N / E_g) over the N tokens of the batch, capped at N; picks of other
        modalities' tokens (score 0 there) are dropped, so the shapes stay static.
        """
        B, T, E = scores.shape
        flat = scores.reshape(B * T, E)
        sizes = [n for n in self.expert_groups for _ in range(n)]  # group size of each expert
        weights = torch.zeros_like(flat)
        capacity = [min(B * T, math.ceil(self.capacity_factor * self.topk * B * T / n)) for n in sizes]
        for e in range(E):  # E is small; each expert's top-C is one topk call
            value, index = flat[:, e].topk(capacity[e])
            keep = allowed.reshape(B * T, E)[index, e]
            weights[index, e] = torch.where(keep, value, torch.zeros_like(value))
        return weights.view(B, T, E)

    def _aux_router_weights(self, x, scores, allowed) -> torch.Tensor:
        """Causal routing: expert e serves token t iff the auxiliary router predicts so (p > 0.5)."""
        picked = (self.aux_router(x).float().sigmoid() > 0.5) & allowed
        return torch.where(picked, scores, torch.zeros_like(scores))

    def _aux_router_loss(self, x, weights, allowed) -> torch.Tensor:
        """BCE of the auxiliary router against expert choice's decisions, on detached inputs and tokens' groups."""
        target = (weights > 0).float()
        logits = self.aux_router(x.detach()).float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        mask = allowed.float()
        return (bce * mask).sum() / mask.sum().clamp(min=1.0)

    def _run_experts(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), weights (N, E) -> sum_e weights[:, e] * expert_e(x) over tokens with weight > 0.

        Loops over experts (a handful); each expert runs only on the tokens it serves."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            index = torch.nonzero(weights[:, e] > 0).flatten()
            xe = x.index_select(0, index)
            h = F.silu(xe @ self.w_gate[e].t()) * (xe @ self.w_up[e].t())
            ye = (h @ self.w_down[e].t()) * weights.index_select(0, index)[:, e : e + 1].to(x.dtype)
            out = out.index_add(0, index, ye)
        return out


def _top_k_weights(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, T, E) scores -> top-k renormalised weights, 0 elsewhere (rows of all zeros stay zero)."""
    value, index = scores.topk(topk, dim=-1)
    value = value / value.sum(-1, keepdim=True).clamp(min=1e-20)
    return torch.zeros_like(scores).scatter(-1, index, value)
