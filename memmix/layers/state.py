"""Row operations shared by the recurrent-state dataclasses whose every field is a (N, ...) tensor (one row per
sequence): keep or reorder sequences for generate() (batch selection, beam search), and merge two states."""
from __future__ import annotations

from dataclasses import fields

import torch


class SequenceRows:
    """Mixin for a dataclass of (N, ...) tensors: select, reorder and where act on every field's first axis."""

    def select(self, index: torch.Tensor):
        """Keep / repeat / reorder sequences: index (N',) int64."""
        index = index.to(getattr(self, fields(self)[0].name).device)
        return type(self)(*(getattr(self, f.name).index_select(0, index) for f in fields(self)))

    def reorder(self, beam_idx: torch.Tensor):
        """Beam search: rows follow beam_idx (N,) int64."""
        return self.select(beam_idx)

    def where(self, keep: torch.Tensor, other):
        """Rows where keep (N,) bool is True from self, the others from `other`."""
        values = []
        for f in fields(self):
            new, old = getattr(self, f.name), getattr(other, f.name)
            values.append(torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, old))
        return type(self)(*values)
