"""Helpers shared by test files in every tests/ folder (tests/conftest.py puts this folder on the path,
also for the interpreter scripts that its interpret_results fixture starts)."""
from __future__ import annotations

import contextlib
import json
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


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / ||expected|| in float64; the absolute error where ||expected|| <= floor."""
    diff = (actual.double() - expected.double()).norm().item()
    ref = expected.double().norm().item()
    return diff / ref if ref > floor else diff


def print_case_results(run_case: Callable[[str, int], dict], cases: dict) -> None:
    """An interpreter test script's output: one JSON object {case name: run_case(name, seed)}, seeds 0, 1, ..."""
    print(json.dumps({name: run_case(name, seed) for seed, name in enumerate(cases)}))


@contextlib.contextmanager
def forced_sequence_form(form: Optional[str]) -> Iterator[None]:
    """Inside the block memmix.ops.triton runs the delta rules on one form of its kernels: "chunked" or "recurrent"
    (None: its own choice by head size). Needs Triton."""
    import memmix.ops.triton as backend

    default = backend.RECURRENT_MAX_K
    backend.RECURRENT_MAX_K = {None: default, "chunked": 0, "recurrent": backend.RECURRENT_KERNEL_MAX_K}[form]
    try:
        yield
    finally:
        backend.RECURRENT_MAX_K = default


@contextlib.contextmanager
def count_recurrence_passes() -> Iterator[dict]:
    """{"forward": n, "backward": n}, filled inside the block: passes of the delta-rule kernels over their heads.
    Chunked form: launches of its output kernel (one per forward head group; none when every sequence fits one
    chunk) and of its backward sequential kernel (one per backward head group). Recurrent form: its forward and
    backward launches (all heads each). Needs Triton."""
    from memmix.ops.triton import gated_delta_rule as kernels, recurrent_delta_rule as recurrent

    originals = kernels._output, kernels._state_grad, recurrent._launch
    passes = {"forward": 0, "backward": 0}

    def counted(direction, launch):
        def run(*args, **kwargs):
            passes[direction] += 1
            return launch(*args, **kwargs)
        return run

    def recurrent_launch(kernel, *args, **kwargs):
        passes["backward" if kernel is recurrent.recurrent_bwd_kernel else "forward"] += 1
        return originals[2](kernel, *args, **kwargs)

    kernels._output, kernels._state_grad = counted("forward", originals[0]), counted("backward", originals[1])
    recurrent._launch = recurrent_launch
    try:
        yield passes
    finally:
        kernels._output, kernels._state_grad, recurrent._launch = originals


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
