"""Next-token cross-entropy of the causal LMs, over every position or only at the positions the caller names.

Position p of a (B, T) sequence predicts labels[:, p + 1] (the usual Hugging Face shift). A target is not scored
where its label is -100, where `attention_mask` marks it as padding, or across a `cu_seqlens` document boundary.
With `loss_positions` (B, Q) the LM head runs on the Q gathered hidden states of every row only, and the loss is
the full loss restricted to those positions: the mean over the gathered targets that are scored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memmix.labels import IGNORE_INDEX
from memmix.ops.dtypes import compute_dtype


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
        # the last token of every document but the final one; bounds padded with T (empty documents, as a CUDA graph's
        # static shapes need) point one past the targets, into a column that is dropped
        boundaries = cu_seqlens[1:-1].to(targets.device) - 1
        targets = F.pad(targets, (0, 1), value=IGNORE_INDEX)
        targets = targets.index_fill(1, boundaries, IGNORE_INDEX)  # a Scalar fill: no host value inside a graph
        targets = targets[:, :-1]
    return targets


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    loss_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy (at least float32) over the scored targets.

    logits (B, T, V) for every position, or (B, Q, V) for the positions in loss_positions (B, Q) int64;
    labels (B, T) int64 (-100 = ignored); attention_mask, cu_seqlens: as in next_token_targets.
    """
    if loss_positions is None:
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must have shape (B, T) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
        logits = logits[:, :-1]  # position T - 1 has no target
        targets = next_token_targets(labels, attention_mask, cu_seqlens)  # (B, T-1)
    else:
        if labels.dim() != 2:
            raise ValueError(f"labels must have shape (B, T), got {tuple(labels.shape)}")
        check_loss_positions(loss_positions, labels.shape[0], labels.shape[1])
        if loss_positions.shape != logits.shape[:2]:
            raise ValueError(f"logits must have shape (B, Q, V) with (B, Q) = loss_positions.shape "
                             f"{tuple(loss_positions.shape)}, got {tuple(logits.shape)}")
        targets = next_token_targets(labels, attention_mask, cu_seqlens).gather(1, loss_positions)  # (B, Q)
    logits = logits.to(compute_dtype(logits.dtype))  # half -> float32, float64 stays
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def fused_lm_loss(
    hidden_states: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    loss_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """causal_lm_loss(hidden_states @ head_weight^T, ...) without the logits ever whole (memmix.ops.linear_cross_entropy).

    hidden_states (B, T, D) for every position, or (B, Q, D) gathered at loss_positions (B, Q); head_weight (V, D).
    Under autocast the product runs in the autocast dtype, as the head's F.linear would.
    """
    from memmix.ops.linear_cross_entropy import linear_cross_entropy

    if loss_positions is None:
        hidden_states = hidden_states[:, :-1]  # position T - 1 has no target
        targets = next_token_targets(labels, attention_mask, cu_seqlens)  # (B, T-1)
    else:
        targets = next_token_targets(labels, attention_mask, cu_seqlens).gather(1, loss_positions)  # (B, Q)
    device = hidden_states.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_states.dtype
    with torch.autocast(device, enabled=False):
        return linear_cross_entropy(hidden_states.reshape(-1, hidden_states.shape[-1]).to(dtype),
                                    head_weight.to(dtype), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def check_loss_positions(loss_positions, batch_size: int, seq_len: int) -> None:
    """Validate loss_positions (B, Q >= 1) int64 with values in [0, T - 1) at the model boundary.

    The range is checked on CPU tensors only: reading an accelerator tensor would synchronise the host. There an
    index out of range fails inside the gather (a device-side assert on CUDA).
    """
    if (
        not torch.is_tensor(loss_positions)
        or loss_positions.dtype != torch.int64
        or loss_positions.dim() != 2
        or loss_positions.shape[0] != batch_size
        or loss_positions.shape[1] < 1
    ):
        described = f"{loss_positions.dtype} {tuple(loss_positions.shape)}" if torch.is_tensor(loss_positions) else (
            repr(type(loss_positions).__name__))
        raise ValueError(f"loss_positions must be an int64 tensor of shape (B={batch_size}, Q >= 1), got {described}")
    if seq_len < 2:
        raise ValueError(f"loss_positions needs T >= 2 tokens (position p scores label p + 1), got T={seq_len}")
    if loss_positions.device.type != "cpu":
        return
    if bool(((loss_positions < 0) | (loss_positions >= seq_len - 1)).any()):
        raise ValueError(
            f"loss_positions must be in [0, T - 1 = {seq_len - 1}) (position p scores label p + 1), got values in "
            f"[{int(loss_positions.min())}, {int(loss_positions.max())}]"
        )


def gather_positions(hidden_states: torch.Tensor, loss_positions: torch.Tensor) -> torch.Tensor:
    """(B, T, D) hidden states at loss_positions (B, Q) -> (B, Q, D); static shapes, no host synchronisation."""
    index = loss_positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])  # (B, Q, D)
    return hidden_states.gather(1, index)
