"""Model presets for `memmix train --model NAME`: MoM and its GDN / Transformer baselines.

The 340M/1.3B shapes follow the MoM paper: hidden 1024/2048, 24 layers, 4 heads of 256, 4 memories,
top-2 routing and a shared memory. `gdn-*` is the same stack with one always-selected memory (a Gated
DeltaNet); `attention-*` replaces every layer with softmax attention (head size 64); `bmojo-*` are the
B'MOJO models of memmix.models.configuration_bmojo.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable

from memmix.data.errors import InputError
from memmix.models.configuration_bmojo import BMOJO_PRESETS

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


PRESETS: dict[str, dict] = {}
for _size, _shape in _SIZES.items():
    PRESETS[f"mom-{_size}"] = dict(_shape, **_MOM)
    PRESETS[f"gdn-{_size}"] = dict(_shape, **_GDN)
    PRESETS[f"attention-{_size}"] = _attention(_shape)
PRESETS["tiny"] = PRESETS["mom-tiny"]

# name -> factory(vocab_size, overrides) -> nn.Module, for models that are not MoMConfig presets (tests, plugins)
CUSTOM_MODELS: dict[str, Callable] = {}


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(BMOJO_PRESETS) + sorted(CUSTOM_MODELS)


def check_preset(name: str) -> None:
    if name in PRESETS or name in BMOJO_PRESETS or name in CUSTOM_MODELS:
        return
    close = difflib.get_close_matches(name, preset_names(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise InputError(f"unknown model preset '{name}'; {hint}choose one of: {', '.join(preset_names())}")


def preset_config_kwargs(name: str, vocab_size: int, overrides: dict | None = None) -> dict:
    """MoMConfig keyword arguments of a preset with `overrides` applied."""
    check_preset(name)
    return dict(PRESETS[name], vocab_size=vocab_size, **(overrides or {}))


def build_model(name: str, vocab_size: int, overrides: dict | None = None, eos_token_id: int | None = None):
    """Instantiate a preset (fresh weights, fp32, on CPU); `eos_token_id` comes from the tokenizer."""
    check_preset(name)
    if name in CUSTOM_MODELS:
        return CUSTOM_MODELS[name](vocab_size, dict(overrides or {}))
    if name in BMOJO_PRESETS:
        from memmix.models.modeling_bmojo import build_bmojo_preset

        try:
            return build_bmojo_preset(name, vocab_size, overrides, eos_token_id=eos_token_id)
        except (TypeError, ValueError) as exc:
            raise InputError(f"bad --model-overrides for preset '{name}': {exc}") from None
    from memmix.models import MoMConfig, MoMForCausalLM

    special = dict(eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=eos_token_id)
    kwargs = dict(special, **preset_config_kwargs(name, vocab_size, overrides))
    try:
        config = MoMConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad --model-overrides for preset '{name}': {exc}") from None
    return MoMForCausalLM(config)
