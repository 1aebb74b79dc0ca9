"""Hugging Face models: MoM causal LM (and attention hybrids), its config and the recurrent generation cache.

Importing this package registers `memmix_mom` with AutoConfig / AutoModel / AutoModelForCausalLM.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from memmix.models.cache import MoMCache
from memmix.models.configuration_bmojo import BMojoConfig
from memmix.models.configuration_mom import MoMConfig
from memmix.models.modeling_mom import (
    MoMBlock,
    MoMCausalLMOutput,
    MoMForCausalLM,
    MoMModel,
    MoMModelOutput,
    MoMPreTrainedModel,
    causal_lm_loss,
)


def _register_auto_classes() -> None:
    """Register with the Auto* factories; idempotent (re-imports and reloads do not raise)."""
    AutoConfig.register(MoMConfig.model_type, MoMConfig, exist_ok=True)
    AutoModel.register(MoMConfig, MoMModel, exist_ok=True)
    AutoModelForCausalLM.register(MoMConfig, MoMForCausalLM, exist_ok=True)


_register_auto_classes()

from memmix.models.modeling_bmojo import BMojoForCausalLM, BMojoModel  # noqa: E402  (registers memmix_bmojo)

__all__ = [
    "BMojoConfig",
    "BMojoForCausalLM",
    "BMojoModel",
    "MoMBlock",
    "MoMCache",
    "MoMCausalLMOutput",
    "MoMConfig",
    "MoMForCausalLM",
    "MoMModel",
    "MoMModelOutput",
    "MoMPreTrainedModel",
    "causal_lm_loss",
]
