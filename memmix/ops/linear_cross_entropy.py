"""The language-model head and its cross-entropy in one op, a chunk of rows at a time.

    loss = linear_cross_entropy(hidden, weight, labels)   # == F.cross_entropy(F.linear(hidden, weight).float(), labels)

A head over a large vocabulary makes logits of N x V: at 16 k tokens and V = 32 k that is 2 GiB in float32, written,
read for the softmax, and written again as its gradient. Here each chunk of rows makes its logits, reduces them to
the loss, and (when a gradient is wanted) turns them at once into the chunk's gradients of `hidden` and `weight`;
the logits never exist for more than one chunk. Memory: the N x D gradient of `hidden` (in its dtype) and the
V x D gradient of `weight` (float32), instead of N x V logits and their gradient. Arithmetic: the same three
products as the plain path. The products run in the inputs' dtype (bf16 under autocast, as F.linear would), the
softmax in float32. With no row to score the loss is 0 (F.cross_entropy gives NaN there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memmix.checks import is_int
from memmix.labels import IGNORE_INDEX
from memmix.ops.dtypes import compute_dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, chunk_size: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight^T against labels, over the rows whose label is not
    ignore_index (0 when there are none). No host synchronisation.

    hidden: (N, D) floating; weight: (V, D), same dtype as hidden (cast it: under autocast, pass the bf16 copies);
    labels: (N,) int64 in [0, V) or ignore_index. chunk_size: rows per chunk (>= 1).
    Returns a 0-d tensor: float32 (float64 for float64 inputs).
    """
    _check(hidden, weight, labels, chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size)
    return _chunked(hidden, weight, labels, ignore_index, chunk_size, want_grads=False)[0]


def _check(hidden, weight, labels, chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be (N, D) and weight (V, D) with the same D, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"linear_cross_entropy: hidden and weight must share one floating dtype, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int64 of shape (N,) = ({hidden.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be an integer >= 1, got {chunk_size!r}")


def _chunked(hidden, weight, labels, ignore_index: int, chunk_size: int, want_grads: bool):
    """(mean loss, d loss_sum / d hidden or None, d loss_sum / d weight or None, number of rows counted)."""
    valid = labels != ignore_index  # (N,)
    count = valid.sum().clamp(min=1).to(compute_dtype(hidden.dtype))
    total = count.new_zeros(())
    grad_hidden = torch.empty_like(hidden) if want_grads else None
    grad_weight = torch.zeros_like(weight, dtype=count.dtype) if want_grads else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h, keep = hidden[rows], valid[rows]
        target = torch.where(keep, labels[rows].long(), 0)
        logits = F.linear(h, weight).to(count.dtype)  # (n, V): the only logits alive
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        total = total + torch.where(keep, lse - picked, 0.0).sum()
        if want_grads:
            # d loss_sum / d logits = softmax - one_hot(target), zero on ignored rows
            dlogits = torch.exp(logits - lse.unsqueeze(1))
            dlogits.scatter_add_(1, target.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
            dlogits = (dlogits * keep.unsqueeze(1)).to(hidden.dtype)
            grad_hidden[rows] = dlogits @ weight
            grad_weight += (dlogits.t() @ h).to(count.dtype)
    return total / count, grad_hidden, grad_weight, count


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int):
        loss, grad_hidden, grad_weight, count = _chunked(hidden, weight, labels, ignore_index, chunk_size, True)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        dh = (grad_hidden * scale).to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        # weight's dtype is hidden's (checked)
        dw = (grad_weight * scale).to(grad_hidden.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None
