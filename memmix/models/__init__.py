"""Hugging Face models: the MoM causal LM (and attention hybrids), the B'MOJO causal LM, their configs, presets
and the recurrent generation cache.

Importing this package registers `memmix_mom` and `memmix_bmojo` with AutoConfig / AutoModel /
AutoModelForCausalLM (register_auto_classes, idempotent).
"""
from __future__ import annotations

from memmix.models.base import MemmixCausalLMOutput, MemmixForCausalLM, MemmixModel, MemmixPreTrainedModel
from memmix.models.cache import LayerStateCache
from memmix.models.configuration_bmojo import BMojoConfig
from memmix.models.configuration_mom import MoMConfig
from memmix.models.loss import causal_lm_loss
from memmix.models.modeling_bmojo import BMojoCausalLMOutput, BMojoForCausalLM, BMojoModel
from memmix.models.modeling_mom import (
    MoMBlock,
    MoMCausalLMOutput,
    MoMForCausalLM,
    MoMModel,
    MoMModelOutput,
    MoMPreTrainedModel,
)

_FAMILIES = ((MoMConfig, MoMModel, MoMForCausalLM), (BMojoConfig, BMojoModel, BMojoForCausalLM))


def register_auto_classes() -> None:
    """Register both model families with AutoConfig / AutoModel / AutoModelForCausalLM; idempotent (repeated
    calls, re-imports and reloads do not raise)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for config_class, model_class, lm_class in _FAMILIES:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, lm_class, exist_ok=True)


register_auto_classes()

__all__ = [
    "BMojoCausalLMOutput",
    "BMojoConfig",
    "BMojoForCausalLM",
    "BMojoModel",
    "LayerStateCache",
    "MemmixCausalLMOutput",
    "MemmixForCausalLM",
    "MemmixModel",
    "MemmixPreTrainedModel",
    "MoMBlock",
    "MoMCausalLMOutput",
    "MoMConfig",
    "MoMForCausalLM",
    "MoMModel",
    "MoMModelOutput",
    "MoMPreTrainedModel",
    "causal_lm_loss",
    "register_auto_classes",
]
