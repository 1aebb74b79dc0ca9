"""The short convolution: causal, depthwise, W taps, then SiLU (the q/k/v convolutions of MoM, B'MOJO and B'MOJO-F,
and the MoM router's).

    short_conv           rows (N, L, C) from zeros (prefill of B'MOJO / B'MOJO-F)
    short_conv_step      one token per row, continuing from its tail (decoding)
    row_tails            the tails a prefill leaves: each row's last W - 1 inputs before its length
    short_conv_segments  segments back to back in one buffer, each continuing from its tail (the MoM mixer's
                         PyTorch path; memmix.ops.mom.torch_path.sequence_conv builds varlen sequences on it)

weight (C, W): tap W - 1 multiplies the current token, tap W - 1 - j the token j steps back. A tail (W - 1, C) holds
a row's last W - 1 inputs, oldest first. The Triton path of the MoM mixer has its own fused gather + convolution
(memmix.ops.mom.triton_path.segment_conv).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _causal_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, C, L), weight (C, W) -> (N, C, L): causal depthwise convolution from zeros, no activation."""
    L, W = x.shape[-1], weight.shape[-1]
    return F.conv1d(x, weight.unsqueeze(1).to(x.dtype), padding=W - 1, groups=weight.shape[0])[..., :L]


def short_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv) along each row from zeros: x (N, L, C), weight (C, W) -> (N, L, C) (a transposed
    view)."""
    return F.silu(_causal_conv(x.transpose(1, 2), weight)).transpose(1, 2)


def short_conv_step(x: torch.Tensor, weight: torch.Tensor,
                    tails: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: x (N, C), weight (C, W), tails (N, W - 1, C) -> y (N, C) and the new tails (N, W - 1, C),
    both in x's dtype."""
    window = torch.cat([tails.to(x.dtype), x[:, None]], dim=1)  # (N, W, C)
    return F.silu((window * weight.t().to(window.dtype)).sum(1)), window[:, 1:]


def row_tails(x: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The tail each row leaves for decoding: x (N, L, C) the convolution's inputs, lengths (N,) the real tokens
    of each row (padding after them) -> (N, width - 1, C), the inputs before position `lengths`, zeros where a row
    has fewer."""
    positions = lengths[:, None] - (width - 1) + torch.arange(width - 1, device=x.device)  # (N, W - 1)
    tails = x.gather(1, positions.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
    return tails * (positions >= 0)[..., None].to(tails.dtype)


def short_conv_segments(x: torch.Tensor, weight: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                        tails: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(causal depthwise conv) over every segment of a buffer, each continuing from its tail.

    x (L, C): R segments back to back, segment r in rows [starts[r], starts[r] + counts[r]) (rows after the last
    segment are convolved as one more segment without a tail); starts (R + 1,), counts (R,) int64; tails
    (R, W - 1, C) or None for zeros. Returns the outputs (L, C) and the new tails (R, W - 1, C).
    Each segment gets W - 1 rows in front of it holding its tail, so one convolution over the whole buffer never
    mixes segments.
    """
    W = weight.shape[-1]
    (L, C), R = x.shape, counts.numel()
    row = torch.arange(L, device=x.device)
    seg_of_row = torch.bucketize(row, starts[1:], right=True)  # (L,) in [0, R]
    shifted = row + (seg_of_row + 1) * (W - 1)
    ext_len = L + (R + 1) * (W - 1)
    ext = x.new_zeros(ext_len, C).index_copy(0, shifted, x)
    tail_rows = (starts[:R] + torch.arange(R, device=x.device) * (W - 1)).unsqueeze(1) + torch.arange(
        W - 1, device=x.device
    )  # (R, W-1)
    if tails is not None:
        ext = ext.index_copy(0, tail_rows.reshape(-1), tails.reshape(-1, C).to(ext.dtype))
    y = _causal_conv(ext.t().unsqueeze(0), weight)[0].t()
    out = F.silu(y.index_select(0, shifted))
    new_tails = ext.index_select(0, (tail_rows + counts.unsqueeze(1)).reshape(-1)).view(R, W - 1, C)
    return out, new_tails
