"""Next-token cross-entropy of the causal LMs.

Position p of a (B, T) sequence predicts labels[:, p + 1] (the usual Hugging Face shift). A target is not scored
where its label is -100, where `attention_mask` marks it as padding, or across a `cu_seqlens` document boundary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) labels -> (B, T - 1) targets of positions 0 .. T - 2, IGNORE_INDEX where nothing is scored.

    attention_mask (B, T_total): its last T columns mark real tokens; cu_seqlens int64 (N + 1,) with B == 1: the
    last token of a document does not predict the first of the next.
    """
    seq_len = labels.shape[1]
    targets = labels[:, 1:].clone()  # (B, T-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, -seq_len:][:, 1:] == 0, IGNORE_INDEX)
    if cu_seqlens is not None:
        boundaries = cu_seqlens[1:-1].to(targets.device) - 1  # last token of every document but the final one
        targets[:, boundaries] = IGNORE_INDEX
    return targets


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy (at least float32) over the scored targets.

    logits (B, T, V); labels (B, T) int64 (-100 = ignored); attention_mask, cu_seqlens: as in next_token_targets.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape (B, T) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    logits = logits[:, :-1]  # position T - 1 has no target
    targets = next_token_targets(labels, attention_mask, cu_seqlens)  # (B, T-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32, float64 stays
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
