"""Mixture-of-Memories causal language model on the shared skeleton (memmix.models.base): its block, config,
extra outputs (router logits), auxiliary losses, modality-aware generate() and CUDA-graph decoding.

Block (pre-norm): h = h + mixer(attn_norm(h)); h = h + mlp(mlp_norm(h)), where the mixer is a MixtureOfMemories
layer, or causal softmax attention for the layers listed in `config.attn_layers`, and the MLP a SwiGLU MLP or,
with `config.ffn_experts`, a ModalityMoE. Module names follow flash-linear-attention's MoM model (embeddings,
layers.i.attn_norm / attn / mlp_norm / mlp, norm, lm_head) so that `memmix.convert` maps their checkpoints by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from memmix.checks import is_int
from memmix.layers.attention import CausalSelfAttention
from memmix.layers.mlp import SwiGLUMLP
from memmix.layers.moe import ModalityMoE
from memmix.layers.mom import MixtureOfMemories
from memmix.layers.norms import RMSNorm
from memmix.models.base import (
    BlockOutput,
    MemmixCausalLMOutput,
    MemmixForCausalLM,
    MemmixModel,
    MemmixModelOutput,
    MemmixPreTrainedModel,
    cache_kwargs,
    one_cache,
)
from memmix.models.cache import LayerStateCache
from memmix.models.configuration_mom import MoMConfig
from memmix.models.cuda_graph import CudaGraphDecoder, can_graph_decode
from memmix.routing import load_balancing_loss, router_z_loss

# Stacked (P, out, D) projections of the MoM layer, initialised like Linear weights.
_STACKED_PROJECTIONS = ("k_proj", "v_proj", "b_proj", "a_proj")


@dataclass
class MoMModelOutput(MemmixModelOutput):
    """last_hidden_state (B, T, D); cache (LayerStateCache); hidden_states: tuple of (B, T, D), embeddings first;
    router_logits: tuple over MoM layers of (B, T, M) float32; with `ffn_experts`: ffn_router_logits, tuple over
    layers of (B, T, E) float32, and ffn_aux_router_loss (0-d, expert choice in training: the auxiliary routers'
    BCE, mean over layers)."""

    router_logits: tuple[torch.Tensor, ...] | None = None
    ffn_router_logits: tuple[torch.Tensor, ...] | None = None
    ffn_aux_router_loss: torch.Tensor | None = None


@dataclass
class MoMCausalLMOutput(MemmixCausalLMOutput):
    """loss (0-d, CE + aux_loss_scale * aux_loss (+ router_z_loss * z_loss) in training); logits (B, T, V) (see
    MemmixCausalLMOutput); cache; hidden_states; aux_loss (0-d float32 load-balancing loss, per modality group with
    memory_groups); router_logits: tuple over MoM layers of (B, T, M), the routing softmax's input. With
    `ffn_experts`, ffn_aux_loss (0-d): expert choice: the auxiliary routers' BCE (training only; loss adds
    ffn_aux_router_loss_scale * it); token choice: the experts' per-group load-balancing loss (loss adds
    aux_loss_scale * it). z_loss (0-d float32, with config.router_z_loss > 0): the routers' z-loss."""

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    ffn_aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


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
            self.attn = MixtureOfMemories.from_config(config, layer_idx)
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
    ) -> BlockOutput:
        """hidden_states (B, T, D) -> BlockOutput: hidden_states (B, T, D), the new state, router_logits (B, T, M)
        of a MoM mixer, and ffn_router_logits / ffn_aux_router_loss of a MoE MLP.

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
        out = BlockOutput(hidden_states, mixed.state, router_logits=mixed.router_logits)
        if isinstance(self.mlp, ModalityMoE):
            moe = self.mlp(self.mlp_norm(hidden_states), modality_ids, attention_mask)
            out.hidden_states = hidden_states + moe.hidden_states
            out.ffn_router_logits, out.ffn_aux_router_loss = moe.router_logits, moe.aux_router_loss
        else:
            out.hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return out


class MoMPreTrainedModel(MemmixPreTrainedModel):
    """MoM's config, weight init and state size, shared by MoMModel and MoMForCausalLM."""

    config_class = MoMConfig
    _no_split_modules = ["MoMBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        """As MemmixPreTrainedModel, plus the MoM layer's stacked projections and the experts' stacked weights
        ~ N(0, initializer_range); A_log, dt_bias and the conv filters keep the layer's own initialisation."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MixtureOfMemories):
            for name, param in module.named_parameters():
                if name.split(".")[0] in _STACKED_PROJECTIONS and param.dim() == 3:
                    init.normal_(param, mean=0.0, std=std)
        elif isinstance(module, ModalityMoE):
            for param in (module.w_gate, module.w_up, module.w_down):
                init.normal_(param, mean=0.0, std=std)

    def recurrent_state_size(self, context_length: int | None = None, include_conv: bool = True) -> int:
        """Floats of generation state per sequence: MoM memories (+ conv tails), plus KV of attention layers.

        MoM layers hold (M + S) * H * K * V memory floats whatever the context length (with include_conv, plus
        (M + S) (W - 1) (2 H K + H V) conv tails, and (W - 1) hidden_size for router_input "conv"); attention layers
        need `context_length` (capped by the window) and hold 2 * H_kv * head_dim floats per cached token.
        """
        config = self.config
        value_head_dim = int(config.head_dim * config.expand_v)
        num_states = config.num_memories + int(config.shared_mem)
        per_mom_layer = num_states * config.num_heads * config.head_dim * value_head_dim
        if include_conv:
            channels = 2 * config.num_heads * config.head_dim + config.num_heads * value_head_dim
            per_mom_layer += num_states * (config.conv_size - 1) * channels
            if config.router_input == "conv":
                per_mom_layer += (config.conv_size - 1) * config.hidden_size
        total = per_mom_layer * config.num_mom_layers
        if config.attn_layers:
            if context_length is None:
                raise ValueError("context_length is required: this model has attention layers whose KV cache grows")
            cached = context_length if config.attn_window_size is None else min(context_length, config.attn_window_size)
            per_token = 2 * config.attn_num_kv_heads * (config.hidden_size // config.attn_num_heads)
            total += len(config.attn_layers) * per_token * cached
        return total


class MoMModel(MoMPreTrainedModel, MemmixModel):
    """Embeddings, MoM / attention blocks and final norm; returns MoMModelOutput.

    forward takes MemmixModel's arguments and: position_ids (B, T), which override the attention layers' RoPE
    positions (by default they count real tokens, continuing after the cache); modality_ids (B, T_total) int64 in
    [0, num_modalities), the last T columns for these tokens (needs memory_groups or ffn_experts; default: every
    token is modality 0); output_router_logits."""

    block_class = MoMBlock
    output_class = MoMModelOutput
    block_input_names = ("position_ids", "modality_ids")
    output_flag_names = ("output_router_logits",)

    def check_block_inputs(self, block_inputs: dict, batch_size: int, seq_len: int) -> None:
        _check_modality_ids(block_inputs["modality_ids"], self.config, batch_size, seq_len)

    def extra_outputs(self, routing: dict[str, tuple], output_router_logits: bool | None = None) -> dict:
        """router_logits and ffn_router_logits (when asked for), and the mean auxiliary-router loss."""
        aux_losses = routing["ffn_aux_router_loss"]
        return dict(
            router_logits=routing["router_logits"] if output_router_logits and routing["router_logits"] else None,
            ffn_router_logits=(
                routing["ffn_router_logits"] if output_router_logits and routing["ffn_router_logits"] else None
            ),
            ffn_aux_router_loss=torch.stack(aux_losses).mean() if aux_losses else None,
        )


class MoMForCausalLM(MoMPreTrainedModel, MemmixForCausalLM):
    """MoMModel + LM head; loss = shifted cross-entropy (+ aux_loss_scale * load-balancing loss in training)."""

    model_class = MoMModel
    output_class = MoMCausalLMOutput

    def __init__(self, config: MoMConfig):
        super().__init__(config)
        # decode steps on CUDA replay a captured graph (memmix.models.cuda_graph); False opts out
        self.cuda_graph_decoding = True
        self._graph_decoders: dict = {}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: LayerStateCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: LayerStateCache | None = None,
        modality_ids: torch.LongTensor | None = None,
        loss_positions: torch.LongTensor | None = None,
        **kwargs,
    ) -> MoMCausalLMOutput | tuple:
        """As MoMModel (MemmixModel.forward and its own keywords), plus labels, logits_to_keep and loss_positions
        as in MemmixForCausalLM.forward; in training the loss adds the routers' auxiliary losses (aux_loss_scale,
        router_z_loss, ffn_aux_router_loss_scale)."""
        cache = one_cache(past_key_values, cache)
        flags = dict(labels=labels, inputs_embeds=inputs_embeds, cu_seqlens=cu_seqlens, use_cache=use_cache,
                     output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
                     position_ids=position_ids, loss_positions=loss_positions)
        # modality routing and the experts' data-dependent token lists are not graphed
        graphable = modality_ids is None and self.config.ffn_experts is None
        if graphable and can_graph_decode(self, input_ids, cache, flags):
            logits = self._graph_decoder(cache, input_ids.shape[0]).step(input_ids, attention_mask, cache)
            return MoMCausalLMOutput(logits=logits, **cache_kwargs(cache))
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
            cache=cache,
            modality_ids=modality_ids,
        )
        logits, loss = self.head_and_loss(outputs.last_hidden_state, labels, attention_mask, cu_seqlens,
                                          logits_to_keep, loss_positions)
        aux_loss = ffn_aux_loss = z_loss = None
        if labels is not None or output_router_logits:
            aux_loss, z_loss, ffn_aux_loss = self._aux_losses(outputs, attention_mask, modality_ids)
        if loss is not None and self.training:
            if aux_loss is not None and self.config.aux_loss_scale > 0:
                loss = loss + self.config.aux_loss_scale * aux_loss.to(loss.dtype)
            if z_loss is not None:
                loss = loss + self.config.router_z_loss * z_loss.to(loss.dtype)
            if ffn_aux_loss is not None:
                scale = self.config.ffn_aux_router_loss_scale if self.config.ffn_routing == "expert_choice" else (
                    self.config.aux_loss_scale)
                loss = loss + scale * ffn_aux_loss.to(loss.dtype)
        output = MoMCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits if output_router_logits else None,
            ffn_aux_loss=ffn_aux_loss,
            z_loss=z_loss,
            **cache_kwargs(outputs.cache),
        )
        return self.finish(output, return_dict)

    def generate(self, inputs=None, *args, modality_ids=None, generation_modality=None, **kwargs):
        """GenerationMixin.generate with modalities: `modality_ids` (B, T_prompt) int64 gives the prompt tokens'
        modalities (default all 0); every generated token gets `generation_modality` (default
        config.generation_modality). Beams and num_return_sequences repeat modality_ids with the prompt."""
        if generation_modality is None:
            generation_modality = self.config.generation_modality
        if not is_int(generation_modality) or not 0 <= generation_modality < self.config.num_modalities:
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
        """(memories' load-balancing loss or None, their routers' z-loss or None, experts' auxiliary loss or None),
        balanced per modality group. The z-loss is computed only with a weight (config.router_z_loss > 0).

        Experts: expert choice's auxiliary-router BCE (present in training), or token choice's load balance."""
        config = self.config
        aux_loss = z_loss = ffn_aux_loss = None
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
            if config.router_z_loss > 0:
                z_loss = router_z_loss(
                    outputs.router_logits, attention_mask=masks["memories"], mode=config.aux_loss_mode,
                    memory_groups=config.memory_group_sizes, modality_ids=modality_ids,
                )
        if config.ffn_routing == "expert_choice":
            ffn_aux_loss = outputs.ffn_aux_router_loss
        elif outputs.ffn_router_logits is not None:
            ffn_aux_loss = load_balancing_loss(
                outputs.ffn_router_logits, sum(config.ffn_expert_groups), config.ffn_topk,
                attention_mask=masks["experts"], mode=config.aux_loss_mode, memory_groups=config.ffn_expert_groups,
                modality_ids=modality_ids,
            )
        return aux_loss, z_loss, ffn_aux_loss


    def _graph_decoder(self, cache: LayerStateCache, batch_size: int) -> CudaGraphDecoder:
        """The captured decode step for this batch size (captured on first use)."""
        key = (batch_size, self.lm_head.weight.device, self.lm_head.weight.dtype)
        if key not in self._graph_decoders:
            self._graph_decoders[key] = CudaGraphDecoder(self, cache, batch_size)
        return self._graph_decoders[key]


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
