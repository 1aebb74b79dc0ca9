"""Helpers shared by test files in every tests/ folder (tests/conftest.py puts this folder on the path,
also for the interpreter scripts that its interpret_results fixture starts)."""
from __future__ import annotations

import contextlib
import json
from typing import Callable, Iterator, Optional

import torch


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
    """{"forward": n, "backward": n}, filled inside the block: launches of the chunked gated delta rule's output
    kernel (one per forward head group; none when every sequence fits one chunk) and of its backward sequential
    kernel (one per backward head group). Needs Triton (memmix.ops.triton.gated_delta_rule)."""
    from memmix.ops.triton import gated_delta_rule as kernels

    originals = kernels._output, kernels._state_grad
    passes = {"forward": 0, "backward": 0}

    def counted(direction, launch):
        def run(*args, **kwargs):
            passes[direction] += 1
            return launch(*args, **kwargs)
        return run

    kernels._output, kernels._state_grad = counted("forward", originals[0]), counted("backward", originals[1])
    try:
        yield passes
    finally:
        kernels._output, kernels._state_grad = originals
