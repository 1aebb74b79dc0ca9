"""Helpers shared by test files in every tests/ folder (tests/conftest.py puts this folder on the path,
also for the interpreter scripts that its interpret_results fixture starts)."""
from __future__ import annotations

import json
from typing import Callable

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / ||expected|| in float64; the absolute error where ||expected|| <= floor."""
    diff = (actual.double() - expected.double()).norm().item()
    ref = expected.double().norm().item()
    return diff / ref if ref > floor else diff


def print_case_results(run_case: Callable[[str, int], dict], cases: dict) -> None:
    """An interpreter test script's output: one JSON object {case name: run_case(name, seed)}, seeds 0, 1, ..."""
    print(json.dumps({name: run_case(name, seed) for seed, name in enumerate(cases)}))
