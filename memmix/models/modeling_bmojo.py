"""B'MOJO causal language model on the shared skeleton (memmix.models.base): its block, config and state size.

Block (pre-norm): h = h + mixer(attn_norm(h)); h = h + mlp(mlp_norm(h)), the mixer a BMojo (config.variant
"store") or a BMojoF ("f"). The LayerStateCache holds one BMojoState / BMojoFState per layer. Module names follow the
MoM model (embeddings, layers.i.attn_norm / attn / mlp_norm / mlp, norm, lm_head).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from memmix.layers.bmojo import BMojo
from memmix.layers.bmojo_f import BMojoF
from memmix.layers.mlp import SwiGLUMLP
from memmix.layers.norms import RMSNorm
from memmix.models.base import (
    BlockOutput,
    MemmixCausalLMOutput,
    MemmixForCausalLM,
    MemmixModel,
    MemmixModelOutput,
    MemmixPreTrainedModel,
)
from memmix.models.configuration_bmojo import BMojoConfig

MIXERS = {"store": BMojo, "f": BMojoF}  # config.variant -> the block's token mixer


@dataclass
class BMojoModelOutput(MemmixModelOutput):
    """last_hidden_state (B, T, D); cache (LayerStateCache of BMojoState / BMojoFState); hidden_states: tuple of
    (B, T, D)."""


@dataclass
class BMojoCausalLMOutput(MemmixCausalLMOutput):
    """loss (0-d shifted cross-entropy); logits (B, T, V) (see MemmixCausalLMOutput); cache; hidden_states."""


class BMojoBlock(nn.Module):
    """Pre-norm residual block: B'MOJO mixer (BMojo or BMojoF, by config.variant) then SwiGLU MLP."""

    def __init__(self, config: BMojoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = MIXERS[config.variant](config.hidden_size, layer_idx=layer_idx, **config.layer_kwargs())
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, state=None,
                use_cache: bool = False) -> BlockOutput:
        """hidden_states (B, T, D) -> BlockOutput: hidden_states (B, T, D), the new BMojoState / BMojoFState or
        None."""
        mixed = self.attn(self.attn_norm(hidden_states), attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                          state=state, use_cache=use_cache)
        hidden_states = hidden_states + mixed.hidden_states
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return BlockOutput(hidden_states, mixed.state)


class BMojoPreTrainedModel(MemmixPreTrainedModel):
    """B'MOJO's config and state size, shared by BMojoModel and BMojoForCausalLM (conv, A_log and dt_bias keep
    the layer's own initialisation)."""

    config_class = BMojoConfig
    _no_split_modules = ["BMojoBlock"]

    def recurrent_state_size(self, include_conv: bool = True) -> int:
        """Floats of generation state per sequence, whatever the context length.

        Variant "store", per layer: fading state H Dh^2; window 2 H (w - 1) Dh; store and candidates
        (2 Dh + 1) H (E + a) (keys, values, scores); conv tails (W - 1) 3 H Dh when include_conv.
        Variant "f", per layer (BMojoF.state_size): fading state Hf Kf^2; conv tails (W - 1) 3 Hf Kf when
        include_conv; the rings of keys and values, w in-context and 2w fading ones (a fading token enters the
        band w tokens after it is made), 6 w Hkv Dh.
        Integer positions are not counted.
        """
        c = self.config
        if c.variant == "f":
            return sum(m.state_size(include_conv) for m in self.modules() if isinstance(m, BMojoF))
        H, Dh = c.num_heads, c.head_dim
        admissions = c.eidetic_per_chunk if c.eidetic_size > 0 else 0
        per_layer = H * Dh * Dh + 2 * H * (c.window_size - 1) * Dh + (2 * Dh + 1) * H * (c.eidetic_size + admissions)
        if include_conv:
            per_layer += (c.conv_size - 1) * 3 * H * Dh
        return per_layer * c.num_hidden_layers


class BMojoModel(BMojoPreTrainedModel, MemmixModel):
    """Embeddings, B'MOJO blocks and final norm; returns BMojoModelOutput (forward: MemmixModel.forward)."""

    block_class = BMojoBlock
    output_class = BMojoModelOutput


class BMojoForCausalLM(BMojoPreTrainedModel, MemmixForCausalLM):
    """BMojoModel + LM head; loss = shifted cross-entropy (forward: MemmixForCausalLM.forward)."""

    model_class = BMojoModel
    output_class = BMojoCausalLMOutput
