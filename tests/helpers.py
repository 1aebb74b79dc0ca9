"""Helpers shared by test files in every tests/ folder (tests/conftest.py puts this folder on the path,
also for the scripts that run_under_interpreter starts)."""
from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / ||expected|| in float64; the absolute error where ||expected|| <= floor."""
    diff = (actual.double() - expected.double()).norm().item()
    ref = expected.double().norm().item()
    return diff / ref if ref > floor else diff
