"""Hugging Face configuration of the B'MOJO causal language model (every layer a memmix.layers.BMojo)."""
from __future__ import annotations

from transformers import PretrainedConfig

from memmix.layers.bmojo import check_bmojo_args
from memmix.layers.mlp import default_intermediate_size
from memmix.models.checks import LM_FIELD_RULES, check_fields, is_int

# The B'MOJO layer's arguments, checked by its own check_bmojo_args.
_LAYER_FIELDS = ("num_heads", "head_dim", "fading_rule", "window_size", "chunk_size", "eidetic_size",
                 "eidetic_per_chunk", "eviction", "conv_size")


class BMojoConfig(PretrainedConfig):
    """Configuration of `BMojoModel` / `BMojoForCausalLM`; every argument is validated here.

    Each block is a BMojo mixer (fading memory + window + eidetic store read by one attention) then a SwiGLU
    MLP. B'MOJO-specific fields: fading_rule (one of FADING_RULES; "gla" is the diagonal-decay SSM option),
    window_size (exact recent tokens, the token itself included), chunk_size (tokens between store
    admissions), eidetic_size (stored tokens per head, 0 = B'MOJO-F), eidetic_per_chunk (candidates offered
    per chunk), eviction ("score": keep the most innovative, "fifo": keep the most recent admissions).
    `intermediate_size=None` takes fla's GatedMLP default as MoMConfig does.
    """

    model_type = "memmix_bmojo"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        intermediate_size: int | None = None,
        num_heads: int = 8,
        head_dim: int = 128,
        fading_rule: str = "gated_delta",
        window_size: int = 512,
        chunk_size: int = 64,
        eidetic_size: int = 256,
        eidetic_per_chunk: int = 4,
        eviction: str = "score",
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
        fields = {name: arguments[name] for name in (*LM_FIELD_RULES, *_LAYER_FIELDS)}
        check_fields(fields, LM_FIELD_RULES)
        check_bmojo_args(hidden_size=hidden_size, **{name: fields[name] for name in _LAYER_FIELDS})
        del fields["tie_word_embeddings"]  # stored by PretrainedConfig
        for name, value in fields.items():
            setattr(self, name, value)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_kwargs(self) -> dict:
        """Keyword arguments of memmix.layers.BMojo for one layer of this model."""
        return dict({name: getattr(self, name) for name in _LAYER_FIELDS}, norm_eps=self.norm_eps, impl=self.impl)


def __getattr__(name: str):
    """BMOJO_PRESETS and bmojo_recall_config moved to memmix.models.presets; the old import path keeps working
    (memmix.evaluation.recall imports bmojo_recall_config from here)."""
    if name in ("BMOJO_PRESETS", "bmojo_recall_config"):
        from memmix.models import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
