"""Perplexity of a model on held-out text, with chunked or sliding windows."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from memmix.errors import InputError

PPL_MODES = ("chunked", "sliding")


def windows(num_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, num_scored): windows of <= `window` tokens ending `stride` apart.

    Each window scores its last `num_scored` predictions, so every token after the first is scored exactly
    once, with up to `window - stride` tokens of extra context (0 extra when stride == window: chunked).
    """
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            yield begin, end, scored
        prev_end = end
        if end == num_tokens:
            break


def _score_packed(model, pieces: list[tuple[np.ndarray, int]], device, autocast) -> tuple[float, int]:
    """Pack windows into one sequence (cu_seqlens), return (summed NLL of the scored targets, how many)."""
    ids = torch.from_numpy(np.concatenate([p for p, _ in pieces]).astype(np.int64)).unsqueeze(0).to(device)
    lengths = torch.tensor([len(p) for p, _ in pieces])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    with autocast:
        logits = model(input_ids=ids, cu_seqlens=cu_seqlens, use_cache=False).logits  # (1, T, V)
    logits = logits[0].float()
    # position t predicts token t+1; keep the last `scored` predictions of each window
    mask = torch.zeros(ids.shape[1], dtype=torch.bool, device=device)
    for (piece, scored), end in zip(pieces, cu_seqlens[1:].tolist()):
        mask[end - 1 - scored : end - 1] = True
    targets = torch.roll(ids[0], -1)
    nll = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    return float(nll), int(mask.sum())


def check_perplexity_args(window: int, stride: int | None, mode: str, tokens_per_batch: int) -> None:
    """InputError naming the first bad argument (checked before any model is loaded)."""
    if mode not in PPL_MODES:
        raise InputError(f"must be one of {', '.join(PPL_MODES)}; got {mode!r}", "mode")
    if window < 2:
        raise InputError(f"must be >= 2, got {window}", "window")
    if stride is not None and mode == "chunked":
        raise InputError("applies to mode 'sliding' only (chunked windows do not overlap)", "stride")
    if stride is not None and not 1 <= stride <= window:
        raise InputError(f"must be in [1, window={window}], got {stride}", "stride")
    if tokens_per_batch < 1:
        raise InputError(f"must be >= 1, got {tokens_per_batch}", "tokens_per_batch")


@torch.no_grad()
def perplexity(
    model,
    documents: Iterable[np.ndarray],
    window: int = 1024,
    stride: int | None = None,
    mode: str = "chunked",
    tokens_per_batch: int = 16384,
    device: str | torch.device = "cpu",
    autocast=None,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Token-level perplexity over documents (each int (T,), scored separately, memories reset between them).

    mode "chunked": disjoint windows of `window` tokens; "sliding": windows `stride` apart (default window//2),
    each scoring only its new tokens. progress(n) is called after each forward pass with the number of document
    tokens it covered (they add up to the documents' total length). Returns {"nll", "ppl", "tokens", "documents"}.
    """
    check_perplexity_args(window, stride, mode, tokens_per_batch)
    stride = window if mode == "chunked" else (stride or max(1, window // 2))
    autocast = autocast or contextlib.nullcontext()
    total_nll, total_tokens, n_docs, batch, batch_tokens, covered = 0.0, 0, 0, [], 0, 0
    for doc in documents:
        n_docs += 1
        covered_end = 0
        for begin, end, scored in windows(len(doc), window, stride):
            batch.append((np.asarray(doc[begin:end]), scored))
            batch_tokens += end - begin
            covered, covered_end = covered + end - covered_end, end
            if batch_tokens >= tokens_per_batch:
                nll, n = _score_packed(model, batch, device, autocast)
                total_nll, total_tokens, batch, batch_tokens = total_nll + nll, total_tokens + n, [], 0
                covered = _report(progress, covered)
        covered += len(doc) - covered_end  # a 1-token document has no window
    if batch:
        nll, n = _score_packed(model, batch, device, autocast)
        total_nll, total_tokens = total_nll + nll, total_tokens + n
    _report(progress, covered)
    if total_tokens == 0:
        raise InputError("the evaluation data has no token to score (every document is 1 token long or empty)")
    mean = total_nll / total_tokens
    return {"nll": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": total_tokens, "documents": n_docs}


def _report(progress, covered: int) -> int:
    if progress is not None and covered:
        progress(covered)
    return 0
