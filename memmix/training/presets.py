"""The trainer's names for the model presets, which live in memmix.models.presets.

Kept for memmix.training.trainer, memmix.evaluation.loading and their tests: PRESETS (the MoM-family presets),
CUSTOM_MODELS, preset_names, preset_config_kwargs, and check_preset / build_model, whose ValueErrors become
InputErrors (the `memmix` command prints those as one line).
"""
from __future__ import annotations

from memmix.data.errors import InputError
from memmix.models import presets as _presets
from memmix.models.presets import CUSTOM_MODELS, preset_config_kwargs, preset_names
from memmix.models.presets import MOM_PRESETS as PRESETS

__all__ = ["CUSTOM_MODELS", "PRESETS", "build_model", "check_preset", "preset_config_kwargs", "preset_names"]


def check_preset(name: str) -> None:
    try:
        _presets.check_preset(name)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def build_model(name: str, vocab_size: int, overrides: dict | None = None, eos_token_id: int | None = None):
    """memmix.models.presets.build_model; a bad preset name or bad overrides raise InputError."""
    check_preset(name)
    try:
        return _presets.build_model(name, vocab_size, overrides, eos_token_id)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad --model-overrides for preset '{name}': {exc}") from None
