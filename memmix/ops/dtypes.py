"""The one precision rule of memmix's math: what internal sums, norms, softmaxes and recurrent states are computed in."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of internal math and of states: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
