"""B'MOJO causal language model in the Hugging Face style, built like MoMForCausalLM (config, ModelOutput, the
same MoMCache holding one BMojoState per layer, generate()).

Block (pre-norm): h = h + BMojo(attn_norm(h)); h = h + mlp(mlp_norm(h)). Module names follow the MoM model
(embeddings, layers.i.attn_norm / attn / mlp_norm / mlp, norm, lm_head).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from memmix.layers.bmojo import BMojo
from memmix.layers.mlp import SwiGLUMLP
from memmix.layers.norms import RMSNorm
from memmix.models.cache import MoMCache
from memmix.models.configuration_bmojo import BMojoConfig
from memmix.models.modeling_mom import CACHE_FIELD, causal_lm_loss

_NEW_CACHE_NAME = CACHE_FIELD == "cache"


@dataclass
class BMojoModelOutput(ModelOutput):
    """last_hidden_state (B, T, D); cache (MoMCache of BMojoState); hidden_states: tuple of (B, T, D)."""

    last_hidden_state: torch.Tensor | None = None
    if _NEW_CACHE_NAME:
        cache: MoMCache | None = None
    else:
        past_key_values: MoMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BMojoCausalLMOutput(ModelOutput):
    """loss (0-d shifted cross-entropy); logits (B, T, V); cache; hidden_states."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if _NEW_CACHE_NAME:
        cache: MoMCache | None = None
    else:
        past_key_values: MoMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


if not _NEW_CACHE_NAME:
    BMojoModelOutput.cache = property(lambda self: self.past_key_values)
    BMojoCausalLMOutput.cache = property(lambda self: self.past_key_values)


class BMojoBlock(nn.Module):
    """Pre-norm residual block: BMojo mixer then SwiGLU MLP."""

    def __init__(self, config: BMojoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = BMojo(config.hidden_size, layer_idx=layer_idx, **config.layer_kwargs())
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, state=None, use_cache: bool = False):
        """hidden_states (B, T, D) -> (hidden_states (B, T, D), new BMojoState or None)."""
        mixed = self.attn(self.attn_norm(hidden_states), attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                          state=state, use_cache=use_cache)
        hidden_states = hidden_states + mixed.hidden_states
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, mixed.state


class BMojoPreTrainedModel(PreTrainedModel):
    """Weight init and HF plumbing shared by BMojoModel and BMojoForCausalLM."""

    config_class = BMojoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BMojoBlock"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not build a DynamicCache; the model creates its MoMCache on the first forward."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Linear / Embedding weights ~ N(0, initializer_range), norms at 1; conv, A_log, dt_bias keep the
        layer's own initialisation."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            init.ones_(module.weight)

    def recurrent_state_size(self, include_conv: bool = True) -> int:
        """Floats of generation state per sequence, whatever the context length.

        Per layer: fading state H Dh^2; window 2 H (w - 1) Dh; store and candidates (2 Dh + 1) H (E + a)
        (keys, values, scores); conv tails (W - 1) 3 H Dh when include_conv. Integer positions are not counted.
        """
        c = self.config
        H, Dh = c.num_heads, c.head_dim
        admissions = c.eidetic_per_chunk if c.eidetic_size > 0 else 0
        per_layer = H * Dh * Dh + 2 * H * (c.window_size - 1) * Dh + (2 * Dh + 1) * H * (c.eidetic_size + admissions)
        if include_conv:
            per_layer += (c.conv_size - 1) * 3 * H * Dh
        return per_layer * c.num_hidden_layers


class BMojoModel(BMojoPreTrainedModel):
    """Embeddings, blocks and final norm; returns BMojoModelOutput."""

    def __init__(self, config: BMojoConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([BMojoBlock(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: MoMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: MoMCache | None = None,
        **kwargs,
    ) -> BMojoModelOutput | tuple:
        """input_ids (B, T) int64 or inputs_embeds (B, T, D); attention_mask (B, T_total) 0/1 with the last T
        columns for these tokens; cu_seqlens int64 (N+1,) for a packed batch (B == 1, no cache);
        past_key_values / cache: MoMCache from a previous call."""
        cache = _one_cache(past_key_values, cache)
        hidden_states = self._embed(input_ids, inputs_embeds)
        batch_size, seq_len, _ = hidden_states.shape
        _check_masks(attention_mask, cu_seqlens, batch_size, seq_len)
        if cu_seqlens is not None:
            attention_mask = None
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cu_seqlens is not None and (use_cache or cache is not None):
            raise ValueError("cu_seqlens (packed documents) cannot be combined with a cache; pass use_cache=False")
        cache = _usable_cache(cache, use_cache, self.config.num_hidden_layers)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not use_cache

        all_hidden_states = () if output_hidden_states else None
        for idx, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            state = cache.get_layer_state(idx) if cache is not None else None
            if checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    lambda h, blk=block: blk(h, attention_mask, cu_seqlens, None, False)[0], hidden_states)
                new_state = None
            else:
                hidden_states, new_state = block(hidden_states, attention_mask, cu_seqlens, state, use_cache)
            if use_cache:
                cache.set_layer_state(idx, new_state)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if use_cache:
            cache.advance(seq_len)
        output = BMojoModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                  **{CACHE_FIELD: cache if use_cache else None})
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids or (B, T, D) embeddings -> (B, T, D)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, D)")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must have shape (B, T, hidden_size={self.config.hidden_size}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            return inputs_embeds
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        return self.embeddings(input_ids)


class BMojoForCausalLM(BMojoPreTrainedModel, GenerationMixin):
    """BMojoModel + LM head; loss = shifted cross-entropy (never across cu_seqlens boundaries or onto pads)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: BMojoConfig):
        super().__init__(config)
        self.model = BMojoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: MoMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: MoMCache | None = None,
        **kwargs,
    ) -> BMojoCausalLMOutput | tuple:
        """As BMojoModel.forward, plus labels (B, T) int64 (-100 = ignored; shifted inside) and logits_to_keep
        (0 = all, n = last n positions)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                             inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, return_dict=True,
                             cache=_one_cache(past_key_values, cache))
        hidden_states = outputs.last_hidden_state
        if labels is None and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (B, T, V)
        loss = None if labels is None else causal_lm_loss(logits, labels, attention_mask, cu_seqlens)
        output = BMojoCausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     **{CACHE_FIELD: outputs.cache})
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def _one_cache(past_key_values, cache):
    """The cache passed under either name (transformers renamed `past_key_values` to `cache`)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache as either past_key_values or cache, not both")
    return cache if cache is not None else past_key_values


def _usable_cache(cache, use_cache: bool, num_layers: int) -> MoMCache | None:
    """A MoMCache to read from / write to, replacing an empty foreign Cache (e.g. a DynamicCache)."""
    if cache is not None and not isinstance(cache, MoMCache):
        if cache.get_seq_length() > 0:
            raise ValueError(f"past_key_values must be a MoMCache, got a non-empty {type(cache).__name__}")
        cache = None
    if cache is None and use_cache:
        cache = MoMCache(num_layers)
    return cache


def _check_masks(attention_mask, cu_seqlens, batch_size: int, seq_len: int) -> None:
    """Validate the 2-D padding mask and the packed-batch offsets at the model boundary."""
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size
                                       or attention_mask.shape[1] < seq_len):
        raise ValueError(f"attention_mask must be 2-D 0/1 of shape (B={batch_size}, T_total >= {seq_len}), "
                         f"got {tuple(attention_mask.shape)}")
    if cu_seqlens is None:
        return
    if batch_size != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along time), got batch size {batch_size}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seq_len:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={seq_len}, got {cu_seqlens.tolist()}")
    if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("cu_seqlens packs documents without padding; attention_mask must be all ones or None")


def _register_auto_classes() -> None:
    """Register `memmix_bmojo` with AutoConfig / AutoModel / AutoModelForCausalLM; idempotent."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(BMojoConfig.model_type, BMojoConfig, exist_ok=True)
    AutoModel.register(BMojoConfig, BMojoModel, exist_ok=True)
    AutoModelForCausalLM.register(BMojoConfig, BMojoForCausalLM, exist_ok=True)


_register_auto_classes()
