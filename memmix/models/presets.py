"""Every model preset in one place: the shapes of `memmix train --model NAME` and the B'MOJO recall config.

MoM 340M / 1.3B follow the MoM paper: hidden 1024 / 2048, 24 layers, 4 heads of 256, 4 memories, top-2 routing
and a shared memory. `gdn-*` is the same stack with one always-selected memory (a Gated DeltaNet);
`attention-*` makes every layer softmax attention (heads of 64); `bmojo-*` are B'MOJO models (every layer a
memmix.layers.BMojo) and `bmojo-f-*` B'MOJO-F models of the same shapes (every layer a memmix.layers.BMojoF).
`tiny` is `mom-tiny`. The recall benchmark's other models are built in
memmix.evaluation.recall.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from memmix.checks import is_int
from memmix.models.configuration_bmojo import BMojoConfig
from memmix.models.configuration_mom import MoMConfig
from memmix.models.modeling_bmojo import BMojoForCausalLM
from memmix.models.modeling_mom import MoMForCausalLM

_MOM = dict(num_memories=4, topk=2, shared_mem=True, memory_rule="gated_delta")
_GDN = dict(num_memories=1, topk=1, shared_mem=False, memory_rule="gated_delta")
_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32),
    "340m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, head_dim=256),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=4, head_dim=256),
}


def _attention(size: dict) -> dict:
    heads = max(1, size["hidden_size"] // 64)
    return dict(size, **_GDN, attn_layers=list(range(size["num_hidden_layers"])), attn_num_heads=heads)


# name -> MoMConfig keyword arguments (without vocab_size and special tokens)
MOM_PRESETS: dict[str, dict] = {}
for _size, _shape in _SIZES.items():
    MOM_PRESETS[f"mom-{_size}"] = dict(_shape, **_MOM)
    MOM_PRESETS[f"gdn-{_size}"] = dict(_shape, **_GDN)
    MOM_PRESETS[f"attention-{_size}"] = _attention(_shape)
MOM_PRESETS["tiny"] = MOM_PRESETS["mom-tiny"]

# name -> BMojoConfig keyword arguments (without vocab_size and special tokens)
BMOJO_PRESETS: dict[str, dict] = {
    "bmojo-tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32, window_size=64,
                       chunk_size=32, eidetic_size=32, eidetic_per_chunk=2),
    "bmojo-340m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=8, head_dim=128, window_size=512,
                       chunk_size=64, eidetic_size=256, eidetic_per_chunk=4),
    "bmojo-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=16, head_dim=128, window_size=512,
                       chunk_size=64, eidetic_size=256, eidetic_per_chunk=4),
    # B'MOJO-F: the released code's default window is 2048, sized for its long-context primed hybrids. A fading
    # token only reaches queries window_size or more tokens later, so at window 2048 a model trained on rows of
    # 2048 tokens (README's `memmix train`) would never read, nor train, its fading mixer. Window 512 (the
    # store presets' window) keeps the span 2w = 1024 within the training rows; tiny: 32, for short demo rows.
    "bmojo-f-tiny": dict(variant="f", hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32, window_size=32),
    "bmojo-f-340m": dict(variant="f", hidden_size=1024, num_hidden_layers=24, num_heads=8, head_dim=128,
                         window_size=512),
    "bmojo-f-1.3b": dict(variant="f", hidden_size=2048, num_hidden_layers=24, num_heads=16, head_dim=128,
                         window_size=512),
}

# name -> factory(vocab_size, overrides) -> nn.Module, for models that are not config presets (tests, plugins)
CUSTOM_MODELS: dict[str, Callable[[int, dict], nn.Module]] = {}

_FAMILIES = ((MOM_PRESETS, MoMConfig, MoMForCausalLM), (BMOJO_PRESETS, BMojoConfig, BMojoForCausalLM))


def preset_names() -> list[str]:
    return sorted(MOM_PRESETS) + sorted(BMOJO_PRESETS) + sorted(CUSTOM_MODELS)


def check_preset(name: str) -> None:
    """Raise ValueError unless `name` is a preset (or a registered custom model), suggesting the closest name."""
    if name in MOM_PRESETS or name in BMOJO_PRESETS or name in CUSTOM_MODELS:
        return
    close = difflib.get_close_matches(name, preset_names(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(f"unknown model preset '{name}'; {hint}choose one of: {', '.join(preset_names())}")


def preset_config_kwargs(name: str, vocab_size: int, overrides: dict | None = None) -> dict:
    """The config keyword arguments of preset `name` with `vocab_size` and `overrides` applied."""
    check_preset(name)
    for shapes, _, _ in _FAMILIES:
        if name in shapes:
            return dict(shapes[name], vocab_size=vocab_size, **(overrides or {}))
    raise ValueError(f"name must be a MoM or B'MOJO preset (not a custom model) here, got '{name}'")


def build_model(name: str, vocab_size: int, overrides: dict | None = None, eos_token_id: int | None = None) -> nn.Module:
    """A fresh model of preset `name` (fp32, on CPU) with `overrides` applied; `eos_token_id` (the tokenizer's)
    is also the pad token, and there is no BOS token."""
    check_preset(name)
    if name in CUSTOM_MODELS:
        return CUSTOM_MODELS[name](vocab_size, dict(overrides or {}))
    special = dict(eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=eos_token_id)
    kwargs = dict(special, **preset_config_kwargs(name, vocab_size, overrides))
    for shapes, config_class, model_class in _FAMILIES:
        if name in shapes:
            return model_class(config_class(**kwargs))
    raise AssertionError(f"preset {name!r} has no model family")  # unreachable: check_preset passed


def mom_recall_config(vocab_size: int, d_model: int, num_layers: int, head_dim: int, heads_factor: int = 1,
                      **overrides) -> MoMConfig:
    """A MoMConfig for the MQAR recall comparison: heads of head_dim (heads_factor x d_model / head_dim of them:
    gdn-wide's extra heads), attention layers of d_model / head_dim heads, a 2x MLP; overrides pick the variant
    (memories, rule, attn_layers, ...)."""
    num_heads = d_model // head_dim
    fields = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=num_layers,
                  num_heads=heads_factor * num_heads, head_dim=head_dim, expand_v=1.0, attn_num_heads=num_heads,
                  intermediate_size=2 * d_model)
    fields.update(overrides)
    return MoMConfig(**fields)


def bmojo_recall_config(vocab_size: int, d_model: int, num_layers: int, head_dim: int = 32,
                        **overrides) -> BMojoConfig:
    """A BMojoConfig for the MQAR recall comparison: heads of head_dim, a 2x MLP, a short window (64) so that
    recall beyond it must come from the eidetic store (64 tokens per head) or the fading memory."""
    fields = _recall_fields(vocab_size, d_model, num_layers, head_dim)
    fields.update(window_size=64, chunk_size=32, eidetic_size=64, eidetic_per_chunk=8)
    fields.update(overrides)
    return BMojoConfig(**fields)


def bmojo_f_recall_config(vocab_size: int, d_model: int, num_layers: int, head_dim: int = 32,
                          **overrides) -> BMojoConfig:
    """A B'MOJO-F BMojoConfig for the MQAR recall comparison, shaped as bmojo_recall_config's: the same
    in-context window (64), so the two rows differ in what reaches further back (the eidetic store there, the
    64 fading tokens before the window here); recall beyond 2 x 64 tokens must come from the fading memory."""
    fields = _recall_fields(vocab_size, d_model, num_layers, head_dim)
    fields.update(variant="f", window_size=64)
    fields.update(overrides)
    return BMojoConfig(**fields)


def _recall_fields(vocab_size: int, d_model: int, num_layers: int, head_dim: int) -> dict:
    """The BMojoConfig fields every recall config shares: d_model // head_dim heads of head_dim, a 2x MLP, no
    special tokens."""
    if not (is_int(d_model) and is_int(head_dim) and head_dim >= 1 and d_model % head_dim == 0):
        raise ValueError(f"d_model must be a multiple of head_dim={head_dim}, got {d_model!r}")
    return dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=num_layers,
                num_heads=d_model // head_dim, head_dim=head_dim, intermediate_size=2 * d_model, pad_token_id=None,
                bos_token_id=None, eos_token_id=None)
