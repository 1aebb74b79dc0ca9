"""The short convolution (memmix.ops.short_conv): prefill, decoding steps and segments against a tap-by-tap loop."""
from __future__ import annotations

import pytest
import torch

from memmix.ops.short_conv import short_conv, short_conv_segments, short_conv_step


def _loop(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """silu(sum_j weight[:, W - 1 - j] * x[t - j]) for one row x (L, C), the tail (W - 1, C) before it."""
    W = weight.shape[-1]
    inputs = torch.cat([tail, x])
    rows = [sum(weight[:, W - 1 - j] * inputs[t + W - 1 - j] for j in range(W)) for t in range(x.shape[0])]
    return torch.nn.functional.silu(torch.stack(rows))


@pytest.mark.parametrize("L, W", [(1, 2), (5, 4), (3, 4)])
def test_prefill_and_steps_match_the_loop(L, W):
    torch.manual_seed(L * 10 + W)
    x, weight = torch.randn(2, L, 6, dtype=torch.float64), torch.randn(6, W, dtype=torch.float64)
    zeros = torch.zeros(W - 1, 6, dtype=torch.float64)
    want = torch.stack([_loop(row, weight, zeros) for row in x])
    torch.testing.assert_close(short_conv(x, weight), want)
    tails, steps = zeros.expand(2, -1, -1), []
    for t in range(L):
        y, tails = short_conv_step(x[:, t], weight, tails)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), want)
    torch.testing.assert_close(tails, torch.cat([zeros.expand(2, -1, -1), x], 1)[:, -(W - 1):])


@pytest.mark.parametrize("counts", [[3, 0, 2], [1, 4], [0, 0]])
def test_segments_continue_from_their_tails(counts):
    torch.manual_seed(sum(counts))
    W, C, trash = 3, 4, 2
    counts_t = torch.tensor(counts)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts_t.cumsum(0)])
    x = torch.randn(sum(counts) + trash, C, dtype=torch.float64)
    weight, tails = torch.randn(C, W, dtype=torch.float64), torch.randn(len(counts), W - 1, C, dtype=torch.float64)
    out, new_tails = short_conv_segments(x, weight, starts, counts_t, tails)
    for r, n in enumerate(counts):
        rows = x[starts[r]:starts[r] + n]
        if n:  # an empty segment only keeps its tail
            torch.testing.assert_close(out[starts[r]:starts[r] + n], _loop(rows, weight, tails[r]))
        torch.testing.assert_close(new_tails[r], torch.cat([tails[r], rows])[-(W - 1):])
