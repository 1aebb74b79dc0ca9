"""Helpers shared by test files in every tests/ folder (tests/conftest.py puts this folder on the path,
also for the interpreter scripts that its interpret_results fixture starts)."""
from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Callable, Iterator, Optional

import pytest
import torch


def check_bad_masks_raise(layer, x: torch.Tensor) -> None:
    """The token mixers' shared calling convention: an attention_mask narrower than the new tokens, and cu_seqlens
    with a batch of more than one row, are ValueErrors naming the argument. x: (B > 1, T, D)."""
    batch, length = x.shape[:2]
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(batch, length - 1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, cu_seqlens=torch.tensor([0, length]))


def hand_z_loss(router_logits, mask: torch.Tensor) -> float:
    """Mean over the real tokens of every layer of (log sum_m exp(logit_m))^2, one token at a time.

    router_logits: one (..., M) tensor per layer; mask: (...) matching each layer's leading dims, 0 at padding.
    """
    total, count = 0.0, 0
    for logits in router_logits:
        for row, keep in zip(logits.reshape(-1, logits.shape[-1]).tolist(), mask.reshape(-1).tolist()):
            if keep:
                total += math.log(sum(math.exp(v) for v in row)) ** 2
                count += 1
    return total / count


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / ||expected|| in float64; the absolute error where ||expected|| <= floor."""
    diff = (actual.double() - expected.double()).norm().item()
    ref = expected.double().norm().item()
    return diff / ref if ref > floor else diff


def print_case_results(run_case: Callable[[str, int], dict], cases: dict) -> None:
    """An interpreter test script's output: one JSON object {case name: run_case(name, seed)}, seeds 0, 1, ..."""
    print(json.dumps({name: run_case(name, seed) for seed, name in enumerate(cases)}))


def forced_sequence_form(form: Optional[str]):
    """memmix.ops.triton.forced_form: inside the block the delta rules run on one form of the kernels ("chunked" or
    "recurrent"; None: their own choice by head size). Needs Triton."""
    from memmix.ops.triton import forced_form

    return forced_form(form)


@contextlib.contextmanager
def count_recurrence_passes() -> Iterator[dict]:
    """{"forward": n, "backward": n}, filled when the block ends: passes of the delta-rule kernels over their heads.
    Chunked form: launches of its output kernel (one per forward head group; none when every sequence fits one
    chunk) and of its backward sequential kernel (one per backward head group). Recurrent form: its forward and
    backward launches (all heads each). Needs Triton."""
    from memmix.ops.triton import runtime

    passes = {"forward": 0, "backward": 0}
    with runtime.count_launches() as launches:
        yield passes
    passes["forward"] = launches["chunk_output_kernel"] + launches["recurrent_fwd_kernel"]
    passes["backward"] = launches["state_grad_kernel"] + launches["recurrent_bwd_kernel"]


class EmulatedGraph:
    """A CUDA graph's contract without a GPU: record(fn) keeps fn, replay() calls it. CPU tests pass it as
    TrainStep's `graph_recorder` to check everything around the capture (static inputs, warm-up, the schedule's
    device learning rate, one graph per batch signature) against the eager step."""

    def __init__(self, stream):
        self.fn = None

    def record(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def replay(self) -> Any:
        return self.fn()
