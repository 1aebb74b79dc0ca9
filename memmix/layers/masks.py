"""Which tokens are real: one check shared by the token mixers."""
from __future__ import annotations

import torch


def valid_tokens(x: torch.Tensor, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool, False at padding, for x (B, T, D).

    attention_mask: (B, T_total >= T) 0/1, its last T columns used; cu_seqlens: a packed batch (B == 1), no padding.
    """
    B, T, _ = x.shape
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("pass either attention_mask or cu_seqlens, not both")
        if B != 1:
            raise ValueError(f"cu_seqlens needs a packed batch of size 1, got batch size {B}")
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=x.device)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(
            f"attention_mask must be 2-D (batch, >= seq_len) = ({B}, >= {T}) with 0 at padding, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -T:].to(x.device).bool()
