"""Which tokens are real, and rows of real tokens: shared by the token mixers."""
from __future__ import annotations

import torch

from memmix.checks import check_binary_mask, describe
from memmix.ops.common import _segment_index, pad_packed


def check_hidden_states(x: torch.Tensor, hidden_size: int | None = None) -> None:
    """A token mixer's input: floating (B, T, D), with D == hidden_size when given."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"hidden_states must be a floating (B, T, D) tensor, got {describe(x)}")
    if hidden_size is not None and x.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have hidden size {hidden_size} (its last dimension), got "
                         f"{tuple(x.shape)}")


def valid_tokens(x: torch.Tensor, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool, False at padding, for x (B, T, D).

    attention_mask: (B, T_total >= T) 0/1, its last T columns used; cu_seqlens: a packed batch (B == 1), no padding.
    """
    check_hidden_states(x)
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
    check_binary_mask("attention_mask", attention_mask)
    return attention_mask[:, -T:].to(x.device).bool()


def compact_rows(x: torch.Tensor, valid: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """Rows of real tokens, left-aligned: x (B, T, D) -> (N, L, D), lengths (N,) and the inverse map.

    With cu_seqlens (B == 1) every document becomes a row (this reads the bounds on the host); otherwise every
    batch row keeps its real tokens in order. valid: (B, T) bool, or None when every token is real (then nothing
    moves and nothing is read back to the host). The inverse maps (N, L, D) back to (B, T, D) with zeros at pads.
    """
    B, T, D = x.shape
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        index = _segment_index(bounds, x.device)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        L = max(int(lengths.max()), 1) if lengths.numel() else 1
        rows = pad_packed(x, index, len(bounds) - 1, L)
        return rows, lengths.to(x.device).long(), lambda out: out[index].unsqueeze(0)
    if valid is None:
        return x, torch.full((B,), T, dtype=torch.long, device=x.device), lambda out: out
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # real tokens first, in order
    lengths = valid.sum(1)
    rows = x.gather(1, order[..., None].expand(B, T, D))

    def unpack(out: torch.Tensor) -> torch.Tensor:
        out = out * (torch.arange(T, device=x.device) < lengths[:, None])[..., None].to(out.dtype)
        return torch.zeros_like(out).scatter(1, order[..., None].expand_as(out), out)

    return rows, lengths, unpack
