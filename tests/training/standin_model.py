"""A tiny causal LM with the MoM model's interface, for testing the training infrastructure quickly.

forward(input_ids (1, T) or (B, T), cu_seqlens (N+1,) | None, labels | None) -> .loss (CE within documents +
a small auxiliary term, like MoM's load-balancing loss) and .logits (B, T, V). Each block mixes in the running
mean of earlier positions of the same document, so a wrong `cu_seqlens` changes the result.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from memmix.models.presets import CUSTOM_MODELS

NAME = "standin"


def segment_ids(cu_seqlens: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """(T,) document index of every position (all zeros without cu_seqlens)."""
    if cu_seqlens is None:
        return torch.zeros(length, dtype=torch.long, device=device)
    return torch.searchsorted(cu_seqlens[1:], torch.arange(length, device=device), right=True)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)  # (B, T, D)
        total = x.cumsum(1)
        starts = torch.searchsorted(seg, seg)  # (T,) first position of each position's document
        before = torch.where((starts > 0)[None, :, None], total[:, (starts - 1).clamp(min=0)], torch.zeros_like(total))
        count = (torch.arange(seg.numel(), device=h.device) - starts + 1).to(h.dtype)[None, :, None]
        mean = (total - before) / count  # running mean within the document
        return h + self.mix(mean) + self.mlp(torch.tanh(x))


class StandInLM(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.config = SimpleNamespace(vocab_size=vocab_size)

    def forward(self, input_ids, attention_mask=None, cu_seqlens=None, labels=None, **kwargs):
        h = self.embed(input_ids)  # (B, T, D)
        seg = segment_ids(cu_seqlens, input_ids.shape[1], input_ids.device)
        for block in self.layers:
            h = block(h, seg)
        logits = self.lm_head(self.norm(h))  # (B, T, V)
        loss = None
        if labels is not None:
            same_doc = seg[1:] == seg[:-1]  # (T-1,) never predict across a boundary
            ce = F.cross_entropy(logits[:, :-1][:, same_doc].flatten(0, 1).float(),
                                 labels[:, 1:][:, same_doc].flatten())
            loss = ce + 1e-3 * h.pow(2).mean()
        return SimpleNamespace(loss=loss, logits=logits)


def register() -> str:
    CUSTOM_MODELS[NAME] = lambda vocab_size, overrides: StandInLM(vocab_size, **overrides)
    return NAME
