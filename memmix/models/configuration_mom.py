"""Hugging Face configuration of the Mixture-of-Memories causal language model (and its hybrids)."""
from __future__ import annotations

from dataclasses import fields as dataclass_fields

from transformers import PretrainedConfig

from memmix.checks import is_int
from memmix.layers.mlp import default_intermediate_size
from memmix.layers.moe import FFN_ROUTINGS
from memmix.layers.mom import MoMOptions, check_memory_groups
from memmix.models.checks import LM_FIELD_RULES, check_fields, choice, integer, number, optional
from memmix.routing import AUX_LOSS_MODES

# Each stored field's type (and range where it stands alone), in two tables around the layer's own check of its
# options (memmix.layers.mom.MoMOptions.check): the LM's fields and the layer's sizes first, then the rest. The
# helpers at the end of this file check the attention and the modality fields together.
_LAYER_FIELD_RULES = {
    **LM_FIELD_RULES,
    "num_heads": integer(),
    "head_dim": integer(),
    "expand_v": number(),
    "num_memories": integer(),
    "topk": integer(),
    "conv_size": integer(),
}
# the model's fields beyond the layer's options (MoMOptions.check checks those)
_OTHER_FIELD_RULES = {
    "aux_loss_scale": number(non_negative=True),
    "aux_loss_mode": choice(AUX_LOSS_MODES),
    "router_z_loss": number(non_negative=True),
    "attn_num_heads": integer(1),
    "attn_num_kv_heads": integer(1),
    "rope_theta": number(positive=True),
    "attn_window_size": optional(integer(1)),
    "generation_modality": integer(0),
    "ffn_routing": choice(FFN_ROUTINGS),
    "ffn_topk": integer(1),
    "ffn_capacity_factor": number(positive=True),
    "ffn_aux_router_loss_scale": number(non_negative=True),
}


class MoMConfig(PretrainedConfig):
    """Configuration of `MoMModel` / `MoMForCausalLM`; every argument is validated here.

    Layers listed in `attn_layers` are causal softmax attention (RoPE, GQA, optional sliding window); every
    other layer is a MixtureOfMemories layer. `attn_layers = list(range(num_hidden_layers))` is the Transformer
    baseline. `intermediate_size=None` takes fla's GatedMLP default, int(hidden_size * 8 / 3) rounded up to a
    multiple of 256, so that converted flash-linear-attention checkpoints line up. Attention layers use
    head_dim = hidden_size // attn_num_heads; `attn_num_heads=None` means `num_heads`, `attn_num_kv_heads=None`
    means `attn_num_heads`.

    Modalities (MoMa, arXiv 2407.21770): `memory_groups` (e.g. {"text": 4, "image": 2}, sizes summing to
    num_memories, topk <= the smallest) splits the routed memories into modality groups, in dict order: group g
    holds the next `memory_groups[g]` memories and a token of modality g (the model's `modality_ids`) is routed
    only among them; the shared memory stays common. `ffn_experts` (same group names and order, or None = dense
    SwiGLU MLP) turns every block's MLP into a `ModalityMoE` with `ffn_routing` ("token_choice" | "expert_choice"),
    `ffn_topk` and `ffn_capacity_factor`; expert choice trains its auxiliary causal router with a BCE loss scaled
    by `ffn_aux_router_loss_scale` and uses it at inference. `generation_modality` is the modality of the tokens
    that `generate()` appends (overridable per call).

    `low_memory=True` makes the MoM layers hold less memory in training on the Triton path, for more time (see
    MixtureOfMemories).

    Ablations of the router and the convolution (the defaults are the paper's MoM, which official
    checkpoints need):
    - `router_z_loss` (>= 0, default 0): weight of the router z-loss, the mean over real tokens of
      logsumexp(router logits)^2, pooled over the MoM layers as the load-balancing loss
      (memmix.routing.router_z_loss); added to the loss in training like the load-balancing loss, and returned as
      the output's `z_loss`.
    - `router_temperature` (> 0, default 1): the routing softmax runs over logits / temperature; the top-k, the
      mixing weights, the load-balancing loss and the z-loss all read the tempered logits (memmix.routing.route).
    - `router_input` ("token" | "conv", default "token"): route from the layer input, or from a causal depthwise
      short convolution (conv_size taps, SiLU) of it along the whole sequence; "conv" adds a (conv_size - 1,
      hidden_size) tail per MoM layer to the recurrent state.
    - `conv_scope` ("segment" | "sequence", default "segment"): each memory's q/k/v short convolution runs over its
      own tokens (the paper's and fla's semantics) or over the whole sequence before routing (the mixer's PyTorch
      path; docs/design.md).
    """

    model_type = "memmix_mom"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        intermediate_size: int | None = None,
        num_heads: int = 4,
        head_dim: int = 256,
        expand_v: float = 1.0,
        num_memories: int = 4,
        topk: int = 2,
        shared_mem: bool = True,
        single_kv_proj: bool = False,
        memory_rule: str = "gated_delta",
        use_output_gate: bool = True,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        aux_loss_scale: float = 0.01,
        aux_loss_mode: str = "global",
        router_z_loss: float = 0.0,
        router_temperature: float = 1.0,
        router_input: str = "token",
        conv_scope: str = "segment",
        impl: str = "auto",
        low_memory: bool = False,
        attn_layers: list[int] | tuple[int, ...] | None = None,
        attn_num_heads: int | None = None,
        attn_num_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        attn_window_size: int | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        memory_groups: dict[str, int] | None = None,
        generation_modality: int = 0,
        ffn_experts: dict[str, int] | None = None,
        ffn_routing: str = "token_choice",
        ffn_topk: int = 1,
        ffn_capacity_factor: float = 1.0,
        ffn_aux_router_loss_scale: float = 1.0,
        modalities: list[str] | None = None,
        **kwargs,
    ):
        if intermediate_size is None and is_int(hidden_size) and hidden_size >= 1:
            intermediate_size = default_intermediate_size(hidden_size)
        attn_num_heads = num_heads if attn_num_heads is None else attn_num_heads
        attn_num_kv_heads = attn_num_heads if attn_num_kv_heads is None else attn_num_kv_heads
        arguments = locals()
        names = (*_LAYER_FIELD_RULES, *(f.name for f in dataclass_fields(MoMOptions)), *_OTHER_FIELD_RULES)
        fields = {name: arguments[name] for name in dict.fromkeys(names)}
        check_fields(fields, _LAYER_FIELD_RULES)
        # the layer's options, checked once (MoMOptions.check), before the fields derived from its sizes
        options = {f.name: fields[f.name] for f in dataclass_fields(MoMOptions) if f.name != "memory_groups"}
        MoMOptions(**options).check(hidden_size)
        check_fields(fields, _OTHER_FIELD_RULES)
        fields["attn_layers"] = _checked_attention_fields(attn_layers, fields)
        fields.update(_checked_modality_fields(modalities, memory_groups, ffn_experts, fields))
        if fields["memory_groups"] is not None:
            check_memory_groups(list(fields["memory_groups"].values()), num_memories, topk)
        del fields["tie_word_embeddings"]  # stored by PretrainedConfig
        for name, value in fields.items():
            setattr(self, name, value)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def is_attention_layer(self, layer_idx: int) -> bool:
        """True where layer `layer_idx` is softmax attention rather than a MoM layer."""
        return layer_idx in self.attn_layers

    @property
    def num_mom_layers(self) -> int:
        return self.num_hidden_layers - len(self.attn_layers)

    @property
    def num_modalities(self) -> int:
        """Number of modality groups (1 without groups: every token is modality 0)."""
        return max(1, len(self.modalities))

    @property
    def memory_group_sizes(self) -> list[int] | None:
        """memory_groups as the layer's list of group sizes, or None."""
        return None if self.memory_groups is None else list(self.memory_groups.values())

    @property
    def ffn_expert_groups(self) -> list[int] | None:
        """ffn_experts as ModalityMoE's list of experts per group, or None (dense MLP)."""
        return None if self.ffn_experts is None else list(self.ffn_experts.values())


def _checked_attention_fields(attn_layers, fields: dict) -> list[int]:
    """The sorted attention layer indices; their heads must split hidden_size evenly into an even size (RoPE
    rotates pairs), and the KV heads must divide the query heads."""
    attn_layers = _checked_attn_layers(attn_layers, fields["num_hidden_layers"])
    hidden_size, heads, kv_heads = fields["hidden_size"], fields["attn_num_heads"], fields["attn_num_kv_heads"]
    if attn_layers and (hidden_size % heads != 0 or (hidden_size // heads) % 2 != 0):
        raise ValueError(
            f"attn_num_heads must divide hidden_size={hidden_size} into an even head size (RoPE), got {heads}"
        )
    if heads % kv_heads != 0:
        raise ValueError(f"attn_num_kv_heads must be a positive divisor of attn_num_heads={heads}, got {kv_heads!r}")
    return attn_layers


def _checked_modality_fields(modalities, memory_groups, ffn_experts, fields: dict) -> dict:
    """The stored modality fields: modalities, memory_groups and ffn_experts in one group order, checked against
    ffn_topk and generation_modality (memory_groups against topk: the layer's MoMOptions.check)."""
    modalities = _checked_modalities(modalities, memory_groups, ffn_experts)
    memory_groups = _checked_groups("memory_groups", memory_groups, modalities)
    ffn_experts = _checked_groups("ffn_experts", ffn_experts, modalities)
    smallest_expert_group = min(ffn_experts.values()) if ffn_experts is not None else 1
    if fields["ffn_topk"] > smallest_expert_group:
        raise ValueError(
            f"ffn_topk must be in [1, smallest expert group={smallest_expert_group}], got {fields['ffn_topk']!r}"
        )
    num_modalities = max(1, len(modalities))
    if fields["generation_modality"] >= num_modalities:
        raise ValueError(
            f"generation_modality must be an integer in [0, {num_modalities}) (one per modality group), "
            f"got {fields['generation_modality']!r}"
        )
    return dict(modalities=modalities, memory_groups=memory_groups, ffn_experts=ffn_experts)


def _checked_modalities(modalities, memory_groups, ffn_experts) -> list[str]:
    """The modality names in group order: `modalities` if given (a saved config: JSON sorts dict keys), else
    the key order of memory_groups / ffn_experts; [] without groups."""
    given = memory_groups if memory_groups is not None else ffn_experts
    if modalities is None or (not modalities and given is None):  # a saved config without groups holds []
        both = isinstance(memory_groups, dict) and isinstance(ffn_experts, dict)
        if both and list(memory_groups) != list(ffn_experts):
            raise ValueError(
                f"ffn_experts must name the same modalities in the same order as memory_groups "
                f"{list(memory_groups)}, got {list(ffn_experts)}"
            )
        return list(given) if isinstance(given, dict) else []
    if not isinstance(modalities, (list, tuple)) or not isinstance(given, dict) or sorted(modalities) != sorted(given):
        raise ValueError(f"modalities must list the group names of memory_groups / ffn_experts, got {modalities!r}")
    return list(modalities)


def _checked_groups(name: str, groups, modalities: list[str]) -> dict[str, int] | None:
    """A non-empty {modality name: positive count} dict in the order of `modalities`, or None."""
    if groups is None:
        return None
    if (
        not isinstance(groups, dict)
        or not groups
        or any(not isinstance(k, str) or not k for k in groups)
        or any(not is_int(n) or n < 1 for n in groups.values())
    ):
        raise ValueError(
            f"{name} must be a non-empty dict of modality name -> positive integer count "
            f"(e.g. {{'text': 4, 'image': 2}}), got {groups!r}"
        )
    if sorted(groups) != sorted(modalities):
        raise ValueError(f"{name} must name the same modalities as the other groups {modalities}, got {list(groups)}")
    return {key: groups[key] for key in modalities}


def _checked_attn_layers(attn_layers, num_hidden_layers: int) -> list[int]:
    """Sorted list of distinct layer indices in [0, num_hidden_layers)."""
    if attn_layers is None:
        return []
    if not isinstance(attn_layers, (list, tuple)):
        raise ValueError(f"attn_layers must be a list of layer indices, got {attn_layers!r}")
    for index in attn_layers:
        if not is_int(index) or not 0 <= index < num_hidden_layers:
            raise ValueError(
                f"attn_layers indices must be integers in [0, num_hidden_layers={num_hidden_layers}), got {index!r}"
            )
    if len(set(attn_layers)) != len(attn_layers):
        raise ValueError(f"attn_layers must not repeat an index, got {list(attn_layers)}")
    return sorted(attn_layers)
