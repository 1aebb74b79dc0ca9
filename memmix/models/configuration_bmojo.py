"""Hugging Face configuration of the B'MOJO causal language model: every layer a memmix.layers.BMojo
(variant "store") or a memmix.layers.BMojoF (variant "f")."""
from __future__ import annotations

import inspect

from transformers import PretrainedConfig

from memmix.layers.bmojo import check_bmojo_args
from memmix.layers.bmojo_f import check_bmojo_f_args
from memmix.layers.mlp import default_intermediate_size
from memmix.checks import is_int
from memmix.models.checks import LM_FIELD_RULES, check_fields, choice

VARIANTS = ("store", "f")
_FIELD_RULES = {**LM_FIELD_RULES, "variant": choice(VARIANTS)}

# Each variant's layer arguments: those both layers take, then each layer's own (checked by that layer's check).
_SHARED_FIELDS = ("num_heads", "head_dim", "fading_rule", "window_size", "conv_size")
_VARIANT_FIELDS = {
    "store": ("chunk_size", "eidetic_size", "eidetic_per_chunk", "eviction"),
    "f": ("num_kv_heads", "fading_num_heads", "fading_head_dim", "tie_attn_weights", "qk_norm", "rope_theta",
          "attn_impl"),
}


class BMojoConfig(PretrainedConfig):
    """Configuration of `BMojoModel` / `BMojoForCausalLM`; every argument is validated here.

    Each block is a B'MOJO mixer then a SwiGLU MLP. `variant` picks the mixer:

    - "store" (default; every config saved before the variant existed is one): memmix.layers.BMojo, the paper's
      construction. A fading memory (fading_rule; "gla" is the diagonal-decay SSM option), a window of
      window_size exact recent tokens and an eidetic store read by one attention. Its fields: chunk_size
      (tokens between store admissions), eidetic_size (stored tokens per head, 0 = none), eidetic_per_chunk
      (candidates offered per chunk), eviction ("score": keep the most innovative, "fifo": the most recent).
    - "f": memmix.layers.BMojoF, the authors' released B'MOJO-F. A fading mixer (fading_rule, fading_num_heads
      heads of fading_head_dim; None = num_heads / head_dim) writes fading tokens; one softmax attention reads
      the last window_size inputs and the window_size fading tokens before them (span 2 window_size). Its
      fields: num_kv_heads (grouped-query heads, None = num_heads), tie_attn_weights (the fading path reuses
      q/k/v_proj), qk_norm, rope_theta (None = no rotary embedding), attn_impl ("auto" | "dense" | "blocked").

    A config holds the shared fields and its own variant's fields only; a field of the other variant must be
    left at its default. `intermediate_size=None` takes fla's GatedMLP default as MoMConfig does.
    """

    model_type = "memmix_bmojo"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        intermediate_size: int | None = None,
        variant: str = "store",
        num_heads: int = 8,
        head_dim: int = 128,
        fading_rule: str = "gated_delta",
        window_size: int = 512,
        chunk_size: int = 64,
        eidetic_size: int = 256,
        eidetic_per_chunk: int = 4,
        eviction: str = "score",
        num_kv_heads: int | None = None,
        fading_num_heads: int | None = None,
        fading_head_dim: int | None = None,
        tie_attn_weights: bool = True,
        qk_norm: bool = False,
        rope_theta: float | None = 10000.0,
        attn_impl: str = "auto",
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        impl: str = "auto",
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        if intermediate_size is None and is_int(hidden_size) and hidden_size >= 1:
            intermediate_size = default_intermediate_size(hidden_size)
        arguments = locals()
        fields = {name: arguments[name] for name in _FIELD_RULES}
        check_fields(fields, _FIELD_RULES)
        layer_fields = _checked_layer_fields(variant, hidden_size, norm_eps, impl, arguments)
        del fields["tie_word_embeddings"]  # stored by PretrainedConfig
        for name, value in {**fields, **layer_fields}.items():
            setattr(self, name, value)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_kwargs(self) -> dict:
        """Keyword arguments of this variant's layer (memmix.layers.BMojo or BMojoF) for one layer of this model."""
        names = (*_SHARED_FIELDS, *_VARIANT_FIELDS[self.variant])
        return dict({name: getattr(self, name) for name in names}, norm_eps=self.norm_eps, impl=self.impl)


def _checked_layer_fields(variant: str, hidden_size: int, norm_eps, impl, arguments: dict) -> dict:
    """The stored layer fields of `variant` (B'MOJO-F's None head counts resolved), checked by that layer's own
    check; a field of the other variant that is not at its default raises."""
    for other in VARIANTS:
        if other == variant:
            continue
        for name in _VARIANT_FIELDS[other]:
            if arguments[name] != _DEFAULTS[name]:
                raise ValueError(f"{name} is a field of variant={other!r}; with variant={variant!r} leave it at its "
                                 f"default {_DEFAULTS[name]!r}, got {arguments[name]!r}")
    fields = {name: arguments[name] for name in (*_SHARED_FIELDS, *_VARIANT_FIELDS[variant])}
    if variant == "f":
        for name, like in (("num_kv_heads", "num_heads"), ("fading_num_heads", "num_heads"),
                           ("fading_head_dim", "head_dim")):
            if fields[name] is None:
                fields[name] = fields[like]
        check_bmojo_f_args(hidden_size=hidden_size, norm_eps=norm_eps, impl=impl, **fields)
    else:
        check_bmojo_args(hidden_size=hidden_size, **fields)
    return fields


_DEFAULTS = {name: p.default for name, p in inspect.signature(BMojoConfig.__init__).parameters.items()}
