"""The skeleton of memmix's causal language models (MoM and its hybrids, B'MOJO) in the Hugging Face style.

A model family supplies its config, its block and anything extra it returns; the skeleton holds the rest:

    embeddings -> blocks (recurrent cache, activation checkpointing, padding mask or packed documents)
               -> final norm -> LM head (all positions, the last n, or `loss_positions`) -> loss; generate()

A block is called as block(hidden_states (B, T, D), attention_mask, cu_seqlens, state, use_cache, **block_inputs)
and returns a BlockOutput. Module names (embeddings, layers.i, norm, lm_head) follow flash-linear-attention's
models, so that checkpoints map by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from memmix.checks import check_binary_mask, check_token_ids
from memmix.labels import IGNORE_INDEX
from memmix.layers.norms import RMSNorm
from memmix.models.cache import LayerStateCache
from memmix.models.loss import causal_lm_loss, check_loss_positions, fused_lm_loss, gather_positions

# transformers 5.24 renamed the outputs' `past_key_values` to `cache` (generate() reads `outputs["cache"]`, and
# `.past_key_values` on an output logs a deprecation); older 5.x read `past_key_values`. Our outputs declare the
# field that this transformers' own outputs declare.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache: LayerStateCache | None) -> dict:
    """{CACHE_FIELD: cache}, for building an output under this transformers' field name."""
    return {CACHE_FIELD: cache}


@dataclass
class MemmixModelOutput(ModelOutput):
    """last_hidden_state (B, T, D); cache (LayerStateCache, under CACHE_FIELD); hidden_states: tuple of (B, T, D),
    embeddings first, final norm last."""

    last_hidden_state: torch.Tensor | None = None
    if CACHE_FIELD == "cache":
        cache: LayerStateCache | None = None
    else:
        past_key_values: LayerStateCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class MemmixCausalLMOutput(ModelOutput):
    """loss (0-d); logits (B, T, V), (B, n, V) with logits_to_keep=n, or (B, Q, V) with loss_positions (B, Q);
    cache; hidden_states."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if CACHE_FIELD == "cache":
        cache: LayerStateCache | None = None
    else:
        past_key_values: LayerStateCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


if CACHE_FIELD != "cache":  # `.cache` on older transformers too (newer ones have it as the field)
    MemmixModelOutput.cache = property(lambda self: self.past_key_values)
    MemmixCausalLMOutput.cache = property(lambda self: self.past_key_values)


@dataclass
class BlockOutput:
    """What a block returns: hidden_states (B, T, D); state (the layer's new recurrent state, or None); and the
    routing tensors that some blocks make: router_logits (B, T, M) float32 of a MoM mixer, ffn_router_logits
    (B, T, E) float32 and ffn_aux_router_loss (0-d) of a mixture-of-experts MLP."""

    hidden_states: torch.Tensor
    state: Any = None
    router_logits: torch.Tensor | None = None
    ffn_router_logits: torch.Tensor | None = None
    ffn_aux_router_loss: torch.Tensor | None = None


# what the blocks loop collects from each block, one tuple over layers each (BlockOutput's routing fields)
ROUTING_OUTPUTS = ("router_logits", "ffn_router_logits", "ffn_aux_router_loss")
_BLOCK_TENSORS = ("hidden_states",) + ROUTING_OUTPUTS  # what a checkpointed block passes back


class MemmixPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the Hugging Face flags shared by every memmix model."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not build a DynamicCache; the model creates its LayerStateCache on the first forward."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Linear / Embedding weights ~ N(0, initializer_range), biases 0, norm weights 1; other parameters (conv
        filters, decay parameters) keep their layer's initialisation unless a family initialises them."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            init.ones_(module.weight)


class MemmixModel(MemmixPreTrainedModel):
    """Embeddings, blocks and final norm. A family sets `block_class` (called as block_class(config, layer_idx))
    and `output_class` (a MemmixModelOutput), and may add block inputs and outputs (see MoMModel)."""

    block_class = None
    output_class = MemmixModelOutput
    # forward's keywords beyond the shared ones: those every block takes, and those extra_outputs takes
    block_input_names: tuple[str, ...] = ()
    output_flag_names: tuple[str, ...] = ()

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([self.block_class(config, idx) for idx in range(config.num_hidden_layers)])
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
        past_key_values: LayerStateCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: LayerStateCache | None = None,
        **kwargs,
    ) -> MemmixModelOutput | tuple:
        """input_ids (B, T) int64 or inputs_embeds (B, T, D); attention_mask (B, T_total) 0/1 with the last T
        columns for these tokens; cu_seqlens int64 (N+1,) for a packed batch (B == 1, no cache);
        past_key_values / cache: LayerStateCache from a previous call. A family's own keywords
        (`block_input_names`, `output_flag_names`) come through kwargs; other keywords (Hugging Face's generic
        ones) are ignored."""
        cache = one_cache(past_key_values, cache)
        block_inputs = {name: kwargs.get(name) for name in self.block_input_names}
        output_flags = {name: kwargs.get(name) for name in self.output_flag_names}
        hidden_states = self._embed(input_ids, inputs_embeds)
        batch_size, seq_len, _ = hidden_states.shape
        check_masks(attention_mask, cu_seqlens, batch_size, seq_len)
        self.check_block_inputs(block_inputs, batch_size, seq_len)
        if cu_seqlens is not None:
            attention_mask = None  # checked to be all ones; the layers take one or the other
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cu_seqlens is not None and (use_cache or cache is not None):
            raise ValueError("cu_seqlens (packed documents) cannot be combined with a cache; pass use_cache=False")
        cache = usable_cache(cache, use_cache, self.config.num_hidden_layers)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None

        all_hidden_states = () if output_hidden_states else None
        routing = {name: () for name in ROUTING_OUTPUTS}
        for idx, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if checkpointing:
                out = self._checkpointed(block, hidden_states, attention_mask, cu_seqlens, block_inputs)
            else:
                state = cache.get_layer_state(idx) if cache is not None else None
                out = block(hidden_states, attention_mask, cu_seqlens, state, use_cache, **block_inputs)
            hidden_states = out.hidden_states
            if use_cache:
                cache.set_layer_state(idx, out.state)
            for name in ROUTING_OUTPUTS:
                if getattr(out, name) is not None:
                    routing[name] += (getattr(out, name),)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if use_cache:
            cache.advance(seq_len)

        output = self.output_class(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **self.extra_outputs(routing, **output_flags),
            **cache_kwargs(cache if use_cache else None),
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def check_block_inputs(self, block_inputs: dict, batch_size: int, seq_len: int) -> None:
        """Validate a family's extra block inputs (none here)."""

    def extra_outputs(self, routing: dict[str, tuple], **output_flags) -> dict:
        """A family's extra output fields from the routing tensors the blocks returned (none here)."""
        return {}

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids or (B, T, D) embeddings -> (B, T, D)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, D)")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (B, T, hidden_size={self.config.hidden_size}), "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            return inputs_embeds
        check_token_ids("input_ids", input_ids, self.embeddings.num_embeddings)
        return self.embeddings(input_ids)

    def _checkpointed(self, block: nn.Module, hidden_states, attention_mask, cu_seqlens, block_inputs: dict):
        """Run `block` under activation checkpointing (training, no cache). The checkpoint function passes tensors
        only, so the BlockOutput goes through as its non-None tensors and is rebuilt after."""
        present: list[bool] = []

        def run(hidden):
            out = block(hidden, attention_mask, cu_seqlens, None, False, **block_inputs)
            tensors = [getattr(out, name) for name in _BLOCK_TENSORS]
            present[:] = [t is not None for t in tensors]
            return tuple(t for t in tensors if t is not None)

        tensors = iter(self._gradient_checkpointing_func(run, hidden_states))
        return BlockOutput(**{name: next(tensors) if kept else None for name, kept in zip(_BLOCK_TENSORS, present)})


class MemmixForCausalLM(MemmixPreTrainedModel, GenerationMixin):
    """A MemmixModel and an LM head; loss = shifted cross-entropy (memmix.models.loss). A family sets
    `model_class` and `output_class` (a MemmixCausalLMOutput) and may add loss terms (see MoMForCausalLM)."""

    model_class = None
    output_class = MemmixCausalLMOutput
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # with labels, the head and the cross-entropy run a chunk of rows at a time (memmix.ops.linear_cross_entropy)
        # and `logits` is None: the (B, T, V) logits are never whole. How the model runs, not what it computes: not
        # saved with the config (memmix train turns it on for CUDA).
        self.fused_loss = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """transformers' generate(), with the prompt checked first: ids (B, T) within the vocabulary."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            check_token_ids("input_ids", ids, self.config.vocab_size)
        return super().generate(inputs, *args, **kwargs)

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
        past_key_values: LayerStateCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: LayerStateCache | None = None,
        loss_positions: torch.LongTensor | None = None,
        **kwargs,
    ) -> MemmixCausalLMOutput | tuple:
        """As MemmixModel.forward, plus labels (B, T) int64 (-100 = ignored; shifted inside, never predicted across
        cu_seqlens boundaries or onto padded positions), logits_to_keep (0 = all, n = last n positions) and
        loss_positions (B, Q) int64 in [0, T - 1): the positions p whose prediction of labels[:, p + 1] is scored;
        the head then runs at those positions only and logits are (B, Q, V)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                             inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, return_dict=True,
                             cache=one_cache(past_key_values, cache))
        logits, loss = self.head_and_loss(outputs.last_hidden_state, labels, attention_mask, cu_seqlens,
                                          logits_to_keep, loss_positions)
        output = self.output_class(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                   **cache_kwargs(outputs.cache))
        return self.finish(output, return_dict)

    def head_and_loss(self, hidden_states, labels, attention_mask, cu_seqlens, logits_to_keep: int,
                      loss_positions) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, cross-entropy or None) from the final hidden states (B, T, D): the head runs on the positions
        in loss_positions (B, Q), or on the last logits_to_keep positions when there are no labels, else on all.
        With labels and self.fused_loss, logits is None (the head runs inside the loss, a chunk at a time)."""
        batch_size, seq_len, _ = hidden_states.shape
        if labels is not None and labels.shape != (batch_size, seq_len):
            raise ValueError(f"labels must have shape (B, T) = {(batch_size, seq_len)}, got {tuple(labels.shape)}")
        if labels is not None:
            check_token_ids("labels", labels, self.config.vocab_size, ignore_index=IGNORE_INDEX)
        if loss_positions is not None:
            if logits_to_keep:
                raise ValueError("pass loss_positions or logits_to_keep, not both")
            check_loss_positions(loss_positions, batch_size, seq_len)
            hidden_states = gather_positions(hidden_states, loss_positions)  # (B, Q, D)
        elif labels is None and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        if labels is not None and self.fused_loss:
            return None, fused_lm_loss(hidden_states, self.lm_head.weight, labels, attention_mask, cu_seqlens,
                                       loss_positions)
        logits = self.lm_head(hidden_states)  # (B, T | n | Q, V)
        if labels is None:
            return logits, None
        return logits, causal_lm_loss(logits, labels, attention_mask, cu_seqlens, loss_positions)

    def finish(self, output: ModelOutput, return_dict: bool | None):
        """The output as a ModelOutput, or as a tuple when return_dict (default config.return_dict) is False."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def one_cache(past_key_values, cache):
    """The cache passed under either name (transformers renamed `past_key_values` to `cache`)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache as either past_key_values or cache, not both")
    return cache if cache is not None else past_key_values


def usable_cache(cache, use_cache: bool, num_layers: int) -> LayerStateCache | None:
    """A LayerStateCache to read from / write to, replacing an empty foreign Cache (e.g. a DynamicCache)."""
    if cache is not None and not isinstance(cache, LayerStateCache):
        if cache.get_seq_length() > 0:
            raise ValueError(f"past_key_values must be a LayerStateCache, got a non-empty {type(cache).__name__}")
        cache = None
    if cache is None and use_cache:
        cache = LayerStateCache(num_layers)
    return cache


def check_masks(attention_mask, cu_seqlens, batch_size: int, seq_len: int) -> None:
    """Validate the 2-D padding mask and the packed-batch offsets at the model boundary. The values of
    cu_seqlens are checked on CPU tensors only: reading an accelerator tensor would synchronise the host."""
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
            raise ValueError(
                f"attention_mask must be 2-D 0/1 of shape (B={batch_size}, T_total >= {seq_len}), "
                f"got {tuple(attention_mask.shape)}"
            )
        check_binary_mask("attention_mask", attention_mask)
    if cu_seqlens is None:
        return
    if batch_size != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along time), got batch size {batch_size}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type != "cpu":
        return
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seq_len:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={seq_len}, got {cu_seqlens.tolist()}")
    if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("cu_seqlens packs documents without padding; attention_mask must be all ones or None")
