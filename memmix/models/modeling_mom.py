"""Mixture-of-Memories causal language model in the Hugging Face style (config, ModelOutput, Cache, generate).

Block (pre-norm): h = h + mixer(attn_norm(h)); h = h + mlp(mlp_norm(h)), where the mixer is a MixtureOfMemories
layer, or causal softmax attention for the layers listed in `config.attn_layers`.
Module names follow flash-linear-attention's MoM model (embeddings, layers.i.attn_norm / attn / mlp_norm / mlp,
norm, lm_head) so that `memmix.convert` maps their checkpoints by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from memmix.layers.attention import CausalSelfAttention
from memmix.layers.mlp import SwiGLUMLP
from memmix.layers.moe import ModalityMoE, MoEOutput
from memmix.layers.mom import MixtureOfMemories
from memmix.layers.norms import RMSNorm
from memmix.models.cache import MoMCache
from memmix.models.configuration_mom import MoMConfig
from memmix.models.cuda_graph import CudaGraphDecoder, can_graph_decode
from memmix.routing import load_balancing_loss

# transformers >= 5.2x renamed the output field `past_key_values` to `cache` (and generate() reads `cache`);
# older 5.x reads `past_key_values`. Our outputs declare whichever field this transformers expects.
CACHE_FIELD = "cache" if hasattr(ModelOutput, "_replace_old_cache_name") else "past_key_values"
_NEW_CACHE_NAME = CACHE_FIELD == "cache"
# Stacked (P, out, D) projections of the MoM layer, initialised like Linear weights.
_STACKED_PROJECTIONS = ("k_proj", "v_proj", "b_proj", "a_proj")


@dataclass
class MoMModelOutput(ModelOutput):
    """last_hidden_state (B, T, D); cache (MoMCache); hidden_states: tuple of (B, T, D), embeddings first;
    router_logits: tuple over MoM layers of (B, T, M) float32; with `ffn_experts`: ffn_router_logits, tuple over
    layers of (B, T, E) float32, and ffn_aux_router_loss (0-d, expert choice in training: the auxiliary routers'
    BCE, mean over layers)."""

    last_hidden_state: torch.Tensor | None = None
    if _NEW_CACHE_NAME:
        cache: MoMCache | None = None
    else:
        past_key_values: MoMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    ffn_router_logits: tuple[torch.Tensor, ...] | None = None
    ffn_aux_router_loss: torch.Tensor | None = None


@dataclass
class MoMCausalLMOutput(ModelOutput):
    """loss (0-d, CE + aux_loss_scale * aux_loss in training); logits (B, T, V); cache; hidden_states;
    aux_loss (0-d float32 load-balancing loss, per modality group with memory_groups); router_logits: tuple over
    MoM layers of (B, T, M). With `ffn_experts`, ffn_aux_loss (0-d): expert choice: the auxiliary routers' BCE
    (training only; loss adds ffn_aux_router_loss_scale * it); token choice: the experts' per-group
    load-balancing loss (loss adds aux_loss_scale * it)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if _NEW_CACHE_NAME:
        cache: MoMCache | None = None
    else:
        past_key_values: MoMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    ffn_aux_loss: torch.Tensor | None = None


if not _NEW_CACHE_NAME:
    # Let `.cache` work on older transformers too (newer ones provide `.past_key_values` themselves).
    MoMModelOutput.cache = property(lambda self: self.past_key_values)
    MoMCausalLMOutput.cache = property(lambda self: self.past_key_values)


def _cache_kwargs(cache: MoMCache | None) -> dict:
    return {CACHE_FIELD: cache}


class MoMBlock(nn.Module):
    """Pre-norm residual block: mixer (MoM or attention) then SwiGLU MLP."""

    def __init__(self, config: MoMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_attention = config.is_attention_layer(layer_idx)
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        if self.is_attention:
            self.attn = CausalSelfAttention(
                hidden_size=config.hidden_size,
                num_heads=config.attn_num_heads,
                num_kv_heads=config.attn_num_kv_heads,
                rope_theta=config.rope_theta,
                window_size=config.attn_window_size,
                layer_idx=layer_idx,
            )
        else:
            self.attn = MixtureOfMemories(
                config.hidden_size,
                num_heads=config.num_heads,
                head_dim=config.head_dim,
                expand_v=config.expand_v,
                num_memories=config.num_memories,
                topk=config.topk,
                shared_mem=config.shared_mem,
                single_kv_proj=config.single_kv_proj,
                memory_rule=config.memory_rule,
                use_output_gate=config.use_output_gate,
                conv_size=config.conv_size,
                norm_eps=config.norm_eps,
                impl=config.impl,
                layer_idx=layer_idx,
                memory_groups=config.memory_group_sizes,
                low_memory=config.low_memory,
            )
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        if config.ffn_experts is None:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        else:  # MoMa: modality-grouped experts
            self.mlp = ModalityMoE(
                config.hidden_size,
                config.intermediate_size,
                config.ffn_expert_groups,
                routing=config.ffn_routing,
                topk=config.ffn_topk,
                capacity_factor=config.ffn_capacity_factor,
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state=None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        return_moe: bool = False,
    ):
        """hidden_states (B, T, D) -> (hidden_states (B, T, D), router_logits (B, T, M) or None, new state), plus
        the MoE output (MoEOutput, or None for a dense MLP) when return_moe.

        modality_ids (B, >= T) int64: the last T columns are these tokens' modalities (memory groups, experts)."""
        mixer_kwargs = {"position_ids": position_ids} if self.is_attention else {}
        if not self.is_attention and self.attn.memory_groups is not None:
            mixer_kwargs["modality_ids"] = modality_ids
        mixed = self.attn(
            self.attn_norm(hidden_states),
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            state=state,
            use_cache=use_cache,
            **mixer_kwargs,
        )
        hidden_states = hidden_states + mixed.hidden_states
        moe = None
        if isinstance(self.mlp, ModalityMoE):
            moe = self.mlp(self.mlp_norm(hidden_states), modality_ids, attention_mask)
            hidden_states = hidden_states + moe.hidden_states
        else:
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        if return_moe:
            return hidden_states, mixed.router_logits, mixed.state, moe
        return hidden_states, mixed.router_logits, mixed.state


class MoMPreTrainedModel(PreTrainedModel):
    """Weight init and HF plumbing shared by MoMModel and MoMForCausalLM."""

    config_class = MoMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoMBlock"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not build a DynamicCache; the model creates its MoMCache on the first forward."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            init.ones_(module.weight)
        elif isinstance(module, MixtureOfMemories):
            # A_log, dt_bias and the conv filters keep the layer's own initialisation.
            for name, param in module.named_parameters():
                if name.split(".")[0] in _STACKED_PROJECTIONS and param.dim() == 3:
                    init.normal_(param, mean=0.0, std=std)
        elif isinstance(module, ModalityMoE):  # stacked expert weights, like the dense MLP's Linear weights
            for param in (module.w_gate, module.w_up, module.w_down):
                init.normal_(param, mean=0.0, std=std)

    def recurrent_state_size(self, context_length: int | None = None, include_conv: bool = True) -> int:
        """Floats of generation state per sequence: MoM memories (+ conv tails), plus KV of attention layers.

        MoM layers hold (M + S) * H * K * V memory floats whatever the context length; attention layers need
        `context_length` (capped by the window) and hold 2 * H_kv * head_dim floats per cached token.
        """
        config = self.config
        value_head_dim = int(config.head_dim * config.expand_v)
        num_states = config.num_memories + int(config.shared_mem)
        per_mom_layer = num_states * config.num_heads * config.head_dim * value_head_dim
        if include_conv:
            channels = 2 * config.num_heads * config.head_dim + config.num_heads * value_head_dim
            per_mom_layer += num_states * (config.conv_size - 1) * channels
        total = per_mom_layer * config.num_mom_layers
        if config.attn_layers:
            if context_length is None:
                raise ValueError("context_length is required: this model has attention layers whose KV cache grows")
            cached = context_length if config.attn_window_size is None else min(context_length, config.attn_window_size)
            per_token = 2 * config.attn_num_kv_heads * (config.hidden_size // config.attn_num_heads)
            total += len(config.attn_layers) * per_token * cached
        return total


class MoMModel(MoMPreTrainedModel):
    """Embeddings, blocks and final norm; returns MoMModelOutput."""

    def __init__(self, config: MoMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MoMBlock(config, idx) for idx in range(config.num_hidden_layers)])
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
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        cache: MoMCache | None = None,
        modality_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> MoMModelOutput | tuple:
        """input_ids (B, T) int64 or inputs_embeds (B, T, D); attention_mask (B, T_total) 0/1 with the last T
        columns for these tokens; cu_seqlens int64 (N+1,) for a packed batch (B == 1, no cache);
        past_key_values / cache: MoMCache from a previous call; position_ids (B, T) override the attention
        layers' RoPE positions (by default they count real tokens, continuing after the cache);
        modality_ids (B, T_total) int64 in [0, num_modalities), the last T columns for these tokens (needs
        memory_groups or ffn_experts; default: every token is modality 0)."""
        cache = _one_cache(past_key_values, cache)
        hidden_states = self._embed(input_ids, inputs_embeds)
        batch_size, seq_len, _ = hidden_states.shape
        _check_masks(attention_mask, cu_seqlens, batch_size, seq_len)
        _check_modality_ids(modality_ids, self.config, batch_size, seq_len)
        if cu_seqlens is not None:
            attention_mask = None  # checked to be all ones; the layers take one or the other
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cu_seqlens is not None and (use_cache or cache is not None):
            raise ValueError("cu_seqlens (packed documents) cannot be combined with a cache; pass use_cache=False")
        cache = _usable_cache(cache, use_cache, self.config.num_hidden_layers)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None

        all_hidden_states = () if output_hidden_states else None
        router_logits, ffn_router_logits, ffn_aux_losses = (), (), []
        for idx, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            state = cache.get_layer_state(idx) if cache is not None else None
            if checkpointing:
                hidden_states, logits, moe = self._checkpointed(
                    block, hidden_states, attention_mask, cu_seqlens, position_ids, modality_ids
                )
                new_state = None
            else:
                hidden_states, logits, new_state, moe = block(
                    hidden_states, attention_mask, cu_seqlens, state, use_cache, position_ids, modality_ids, True
                )
            if use_cache:
                cache.set_layer_state(idx, new_state)
            if logits is not None:
                router_logits += (logits,)
            if moe is not None:
                ffn_router_logits += (moe.router_logits,)
                if moe.aux_router_loss is not None:
                    ffn_aux_losses.append(moe.aux_router_loss)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if use_cache:
            cache.advance(seq_len)

        output = MoMModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            router_logits=router_logits if output_router_logits and router_logits else None,
            ffn_router_logits=ffn_router_logits if output_router_logits and ffn_router_logits else None,
            ffn_aux_router_loss=torch.stack(ffn_aux_losses).mean() if ffn_aux_losses else None,
            **_cache_kwargs(cache if use_cache else None),
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

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
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        return self.embeddings(input_ids)

    def _checkpointed(self, block: MoMBlock, hidden_states, attention_mask, cu_seqlens, position_ids, modality_ids):
        """Run `block` under activation checkpointing (training without cache): (hidden, router logits, MoEOutput)."""
        has_moe = isinstance(block.mlp, ModalityMoE)
        # which optional tensors the block returns: memory router logits, expert router logits, aux-router loss
        present = [not block.is_attention, has_moe, has_moe and block.mlp.routing == "expert_choice"]

        def run(hidden):
            out, logits, _, moe = block(
                hidden, attention_mask, cu_seqlens, None, False, position_ids, modality_ids, return_moe=True
            )
            extras = [logits] + ([moe.router_logits, moe.aux_router_loss] if has_moe else [None, None])
            return (out, *[t for t, keep in zip(extras, present) if keep])

        outputs = list(self._gradient_checkpointing_func(run, hidden_states))
        hidden = outputs.pop(0)
        logits, moe_logits, aux = [outputs.pop(0) if keep else None for keep in present]
        moe = MoEOutput(None, moe_logits, aux) if has_moe else None
        return hidden, logits, moe


class MoMForCausalLM(MoMPreTrainedModel, GenerationMixin):
    """MoMModel + LM head; loss = shifted cross-entropy (+ aux_loss_scale * load-balancing loss in training)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: MoMConfig):
        super().__init__(config)
        self.model = MoMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # decode steps on CUDA replay a captured graph (memmix.models.cuda_graph); False opts out
        self.cuda_graph_decoding = True
        self._graph_decoders: dict = {}
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
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: MoMCache | None = None,
        modality_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> MoMCausalLMOutput | tuple:
        """As MoMModel.forward, plus labels (B, T) int64 (-100 = ignored; shifted inside, never predicted across
        cu_seqlens boundaries or onto padded positions) and logits_to_keep (0 = all, n = last n positions)."""
        step_cache = _one_cache(past_key_values, cache)
        flags = dict(labels=labels, inputs_embeds=inputs_embeds, cu_seqlens=cu_seqlens, use_cache=use_cache,
                     output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
                     position_ids=position_ids)
        # modality routing and the experts' data-dependent token lists are not graphed
        graphable = modality_ids is None and self.config.ffn_experts is None
        if graphable and can_graph_decode(self, input_ids, step_cache, flags):
            logits = self._graph_decoder(step_cache, input_ids.shape[0]).step(input_ids, attention_mask, step_cache)
            return MoMCausalLMOutput(logits=logits, **_cache_kwargs(step_cache))
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=True,  # needed for the aux loss; returned only if asked for
            return_dict=True,
            cache=_one_cache(past_key_values, cache),
            modality_ids=modality_ids,
        )
        hidden_states = outputs.last_hidden_state
        if labels is None and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (B, T, V)

        router_logits = outputs.router_logits
        aux_loss = ffn_aux_loss = None
        if labels is not None or output_router_logits:
            aux_loss, ffn_aux_loss = self._aux_losses(outputs, attention_mask, modality_ids)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, attention_mask, cu_seqlens)
            if self.training and aux_loss is not None and self.config.aux_loss_scale > 0:
                loss = loss + self.config.aux_loss_scale * aux_loss.to(loss.dtype)
            if self.training and ffn_aux_loss is not None:
                scale = self.config.ffn_aux_router_loss_scale if self.config.ffn_routing == "expert_choice" else (
                    self.config.aux_loss_scale)
                loss = loss + scale * ffn_aux_loss.to(loss.dtype)

        output = MoMCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            aux_loss=aux_loss,
            router_logits=router_logits if output_router_logits else None,
            ffn_aux_loss=ffn_aux_loss,
            **_cache_kwargs(outputs.cache),
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def generate(self, inputs=None, *args, modality_ids=None, generation_modality=None, **kwargs):
        """GenerationMixin.generate with modalities: `modality_ids` (B, T_prompt) int64 gives the prompt tokens'
        modalities (default all 0); every generated token gets `generation_modality` (default
        config.generation_modality). Beams and num_return_sequences repeat modality_ids with the prompt."""
        if generation_modality is None:
            generation_modality = self.config.generation_modality
        if not isinstance(generation_modality, int) or not 0 <= generation_modality < self.config.num_modalities:
            raise ValueError(
                f"generation_modality must be an integer in [0, {self.config.num_modalities}), "
                f"got {generation_modality!r}"
            )
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if modality_ids is None and generation_modality != 0 and prompt is not None:
            modality_ids = torch.zeros(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        if modality_ids is not None:
            kwargs.update(modality_ids=modality_ids, generation_modality=generation_modality)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, modality_ids=None, generation_modality: int = 0, **kwargs):
        """The HF inputs, plus modality_ids for the whole current sequence (B, T_current): the prompt's
        modality_ids, then `generation_modality` for every token generated since (the model uses the last T)."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if modality_ids is not None:
            model_inputs["modality_ids"] = _extend_modality_ids(modality_ids, input_ids.shape[1], generation_modality)
        return model_inputs

    def _aux_losses(self, outputs: MoMModelOutput, attention_mask, modality_ids):
        """(memories' load-balancing loss or None, experts' auxiliary loss or None), balanced per modality group.

        Experts: expert choice's auxiliary-router BCE (present in training), or token choice's load balance."""
        config = self.config
        aux_loss = ffn_aux_loss = None
        masks = {}
        for name, logits in (("memories", outputs.router_logits), ("experts", outputs.ffn_router_logits)):
            if logits is not None:
                seq_len = logits[0].shape[1]
                masks[name] = attention_mask[:, -seq_len:] if attention_mask is not None else None
        if outputs.router_logits is not None:
            aux_loss = load_balancing_loss(
                outputs.router_logits, config.num_memories, config.topk, attention_mask=masks["memories"],
                mode=config.aux_loss_mode, memory_groups=config.memory_group_sizes, modality_ids=modality_ids,
            )
        if config.ffn_routing == "expert_choice":
            ffn_aux_loss = outputs.ffn_aux_router_loss
        elif outputs.ffn_router_logits is not None:
            ffn_aux_loss = load_balancing_loss(
                outputs.ffn_router_logits, sum(config.ffn_expert_groups), config.ffn_topk,
                attention_mask=masks["experts"], mode=config.aux_loss_mode, memory_groups=config.ffn_expert_groups,
                modality_ids=modality_ids,
            )
        return aux_loss, ffn_aux_loss


    def _graph_decoder(self, cache: MoMCache, batch_size: int) -> CudaGraphDecoder:
        """The captured decode step for this batch size (captured on first use)."""
        key = (batch_size, self.lm_head.weight.device, self.lm_head.weight.dtype)
        if key not in self._graph_decoders:
            self._graph_decoders[key] = CudaGraphDecoder(self, cache, batch_size)
        return self._graph_decoders[key]


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy (at least float32) over labels that are not -100.

    logits (B, T, V); labels (B, T) int64; attention_mask (B, T_total), last T columns: padded targets ignored;
    cu_seqlens int64 (N+1,) with B == 1: the last token of a document does not predict the next document.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape (B, T) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    seq_len = labels.shape[1]
    targets = labels[:, 1:].clone()  # (B, T-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, -seq_len:][:, 1:] == 0, -100)
    if cu_seqlens is not None:
        boundaries = cu_seqlens[1:-1].to(targets.device) - 1  # last token of every document but the final one
        targets[:, boundaries] = -100
    shifted = logits[:, :-1]
    shifted = shifted.to(torch.promote_types(shifted.dtype, torch.float32))  # half -> float32, float64 stays
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100)


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


def _extend_modality_ids(modality_ids: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    """(B, P) prompt modalities -> (B, length), the new columns set to `fill`."""
    if modality_ids.shape[1] > length:
        raise ValueError(f"modality_ids covers {modality_ids.shape[1]} tokens but the sequence has only {length}")
    extra = modality_ids.new_full((modality_ids.shape[0], length - modality_ids.shape[1]), fill)
    return torch.cat([modality_ids, extra], dim=1)


def _check_modality_ids(modality_ids, config: MoMConfig, batch_size: int, seq_len: int) -> None:
    """Validate modality_ids (B, >= T) integer in [0, num_modalities) at the model boundary."""
    if modality_ids is None:
        return
    if config.memory_groups is None and config.ffn_experts is None:
        raise ValueError("modality_ids needs modality groups: set memory_groups and/or ffn_experts in the config")
    if (
        modality_ids.dim() != 2
        or modality_ids.shape[0] != batch_size
        or modality_ids.shape[1] < seq_len
        or modality_ids.is_floating_point()
    ):
        raise ValueError(
            f"modality_ids must be an integer tensor of shape (B={batch_size}, T_total >= {seq_len}), "
            f"got {modality_ids.dtype} {tuple(modality_ids.shape)}"
        )
    ids = modality_ids[:, -seq_len:]
    if bool(((ids < 0) | (ids >= config.num_modalities)).any()):
        raise ValueError(
            f"modality_ids must be in [0, {config.num_modalities}) (modalities {config.modalities}), "
            f"got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def _check_masks(attention_mask, cu_seqlens, batch_size: int, seq_len: int) -> None:
    """Validate the 2-D padding mask and the packed-batch offsets at the model boundary."""
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
            raise ValueError(
                f"attention_mask must be 2-D 0/1 of shape (B={batch_size}, T_total >= {seq_len}), "
                f"got {tuple(attention_mask.shape)}"
            )
    if cu_seqlens is None:
        return
    if batch_size != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along time), got batch size {batch_size}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type != "cpu":
        return  # reading values on an accelerator would synchronise the host on every training step
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seq_len:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={seq_len}, got {cu_seqlens.tolist()}")
    if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("cu_seqlens packs documents without padding; attention_mask must be all ones or None")
