"""Hugging Face configuration of the B'MOJO causal language model (every layer a memmix.layers.BMojo)."""
from __future__ import annotations

from transformers import PretrainedConfig

from memmix.layers.bmojo import check_bmojo_args
from memmix.layers.mlp import default_intermediate_size

IMPLS = ("auto", "recurrent", "chunk", "triton")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        _check(_is_int(vocab_size) and vocab_size >= 1, f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        _check(_is_int(num_hidden_layers) and num_hidden_layers >= 1,
               f"num_hidden_layers must be an integer >= 1, got {num_hidden_layers!r}")
        if intermediate_size is None and _is_int(hidden_size) and hidden_size >= 1:
            intermediate_size = default_intermediate_size(hidden_size)
        _check(_is_int(intermediate_size) and intermediate_size >= 1,
               f"intermediate_size must be an integer >= 1 or None, got {intermediate_size!r}")
        check_bmojo_args(hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim, fading_rule=fading_rule,
                         window_size=window_size, chunk_size=chunk_size, eidetic_size=eidetic_size,
                         eidetic_per_chunk=eidetic_per_chunk, eviction=eviction, conv_size=conv_size)
        for name, value in (("norm_eps", norm_eps), ("initializer_range", initializer_range)):
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                   f"{name} must be a number > 0, got {value!r}")
        _check(impl in IMPLS, f"impl must be one of {list(IMPLS)}, got {impl!r}")
        for name, flag in (("tie_word_embeddings", tie_word_embeddings), ("use_cache", use_cache)):
            _check(isinstance(flag, bool), f"{name} must be True or False, got {flag!r}")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.fading_rule = fading_rule
        self.window_size = window_size
        self.chunk_size = chunk_size
        self.eidetic_size = eidetic_size
        self.eidetic_per_chunk = eidetic_per_chunk
        self.eviction = eviction
        self.conv_size = conv_size
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.impl = impl
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_kwargs(self) -> dict:
        """Keyword arguments of memmix.layers.BMojo for one layer of this model."""
        return dict(num_heads=self.num_heads, head_dim=self.head_dim, fading_rule=self.fading_rule,
                    window_size=self.window_size, chunk_size=self.chunk_size, eidetic_size=self.eidetic_size,
                    eidetic_per_chunk=self.eidetic_per_chunk, eviction=self.eviction, conv_size=self.conv_size,
                    norm_eps=self.norm_eps, impl=self.impl)


# Presets for `memmix train --model NAME` (registered in memmix.training.presets).
BMOJO_PRESETS: dict[str, dict] = {
    "bmojo-tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32, window_size=64,
                       chunk_size=32, eidetic_size=32, eidetic_per_chunk=2),
    "bmojo-340m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=8, head_dim=128, window_size=512,
                       chunk_size=64, eidetic_size=256, eidetic_per_chunk=4),
    "bmojo-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=16, head_dim=128, window_size=512,
                       chunk_size=64, eidetic_size=256, eidetic_per_chunk=4),
}


def bmojo_recall_config(vocab_size: int, d_model: int, num_layers: int, head_dim: int = 32,
                        **overrides) -> BMojoConfig:
    """A BMojoConfig for the MQAR recall comparison: heads of head_dim, a 2x MLP, a short window (64) so that
    recall beyond it must come from the eidetic store (64 tokens per head) or the fading memory."""
    _check(_is_int(d_model) and _is_int(head_dim) and head_dim >= 1 and d_model % head_dim == 0,
           f"d_model must be a multiple of head_dim={head_dim}, got {d_model!r}")
    fields = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=num_layers,
                  num_heads=d_model // head_dim, head_dim=head_dim, intermediate_size=2 * d_model, window_size=64,
                  chunk_size=32, eidetic_size=64, eidetic_per_chunk=8, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None)
    fields.update(overrides)
    return BMojoConfig(**fields)
