"""Convert a flash-linear-attention / official MoM `MomForCausalLM` checkpoint into a memmix checkpoint.

    python -m memmix.convert SRC_DIR DST_DIR

Two source layouts: fla's `MomForCausalLM` (model_type "mom") and the official OpenSparseLLMs/MoM
`MomGatedDeltaNetForCausalLM` (model_type "mom_gated_deltanet": num_experts / single_expert / use_gate in the
config, a fused (2I, D) `mlp.gate_proj` and an unused per-layer `attn.D`).
Their per-memory projections `attn.{k,v,b,a}_proj.{i}.weight` (i < num_memories) are stacked into our
(P, out, D) parameters; their shared memory's `attn.shared_{k,v,b,a}.weight` become the last row (or the only
row with single_kv_proj). Every other weight keeps its name (our module names follow theirs).
Options we do not reproduce raise ValueError naming the option.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from memmix.errors import InputError
from memmix.files import atomic_replace_dir, check_outputs_apart
from memmix.layers.mlp import default_intermediate_size
from memmix.models import MoMConfig, MoMForCausalLM

# fla config key -> our config key, copied as is.
_SAME_MEANING = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_heads": "num_heads",
    "head_dim": "head_dim",
    "expand_v": "expand_v",
    "num_memories": "num_memories",
    "topk": "topk",
    "shared_mem": "shared_mem",
    "single_kv_proj": "single_kv_proj",
    "use_output_gate": "use_output_gate",
    "conv_size": "conv_size",
    "norm_eps": "norm_eps",
    "initializer_range": "initializer_range",
    "aux_loss_scale": "aux_loss_scale",
    "tie_word_embeddings": "tie_word_embeddings",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
# fla defaults (MomConfig) for keys a config.json may omit.
_FLA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_heads": 4,
    "head_dim": 256,
    "expand_v": 1.0,
    "num_memories": 4,
    "topk": 2,
    "shared_mem": True,
    "single_kv_proj": False,
    "use_output_gate": True,
    "conv_size": 4,
    "norm_eps": 1e-6,
    "initializer_range": 0.02,
    "aux_loss_scale": 0.01,
    "tie_word_embeddings": False,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# The official OpenSparseLLMs/MoM config: its key names for ours, and its defaults where they differ.
_OFFICIAL_RENAMES = {"num_experts": "num_memories", "single_expert": "single_kv_proj", "use_gate": "use_output_gate"}
_OFFICIAL_DEFAULTS = {"expand_v": 2.0, "num_heads": 6, "num_hidden_layers": 21, "num_memories": 8, "shared_mem": False}
_STACKED = {"k_proj": "shared_k", "v_proj": "shared_v", "b_proj": "shared_b", "a_proj": "shared_a"}


def config_from_fla(fla_config: Mapping) -> MoMConfig:
    """MoMConfig equivalent to an fla `MomConfig` or official `MomGatedDeltaNetConfig` dict (their config.json).

    Unsupported options raise ValueError.
    """
    fla_config = _fla_style(fla_config)
    _reject_unsupported(fla_config)
    kwargs = {ours: fla_config[theirs] for theirs, ours in _SAME_MEANING.items()}
    intermediate_size = fla_config.get("intermediate_size")
    if intermediate_size is None:
        intermediate_size = default_intermediate_size(kwargs["hidden_size"], fla_config.get("hidden_ratio") or 4)
    kwargs["intermediate_size"] = intermediate_size
    kwargs["expand_v"] = float(kwargs["expand_v"])
    kwargs["memory_rule"] = "gated_delta"
    kwargs["aux_loss_mode"] = "global"  # fla concatenates all layers' router logits
    return MoMConfig(**kwargs)


def _fla_style(fla_config: Mapping) -> dict:
    """The config under fla's key names, with the defaults of its model type filled in."""
    model_type = fla_config.get("model_type", "mom")
    if model_type == "mom":
        return {**_FLA_DEFAULTS, **fla_config}
    if model_type == "mom_gated_deltanet":
        renamed = {_OFFICIAL_RENAMES.get(key, key): value for key, value in fla_config.items()}
        return {**_FLA_DEFAULTS, **_OFFICIAL_DEFAULTS, **renamed}
    raise ValueError(f"model_type must be 'mom' (fla) or 'mom_gated_deltanet' (official MoM), got {model_type!r}")


def _reject_unsupported(fla_config: Mapping) -> None:
    """ValueError for fla options whose behaviour memmix does not reproduce."""
    if fla_config.get("norm_first", False):
        raise ValueError("norm_first must be False (memmix blocks are pre-norm with attn_norm / mlp_norm)")
    backend = fla_config.get("mom_backend", "gated_deltanet")
    if backend != "gated_deltanet":
        raise ValueError(f"mom_backend must be 'gated_deltanet', got {backend!r}")
    capacity = fla_config.get("capacity", 1.0)
    if capacity != 1.0:
        raise ValueError(f"capacity must be 1.0 (memmix never drops tokens), got {capacity!r}")
    if not fla_config.get("use_short_conv", True):
        raise ValueError("use_short_conv must be True (memmix MoM layers always use the short convolution)")
    if fla_config.get("attn") is not None:
        raise ValueError("attn must be None: fla hybrid attention layers are not converted (different naming)")
    if fla_config.get("attnres_block_size") is not None:
        raise ValueError("attnres_block_size must be None: attention residuals are not supported")
    hidden_act = fla_config.get("hidden_act", "swish")
    if hidden_act not in ("swish", "silu"):
        raise ValueError(f"hidden_act must be 'swish' or 'silu' (SwiGLU MLP), got {hidden_act!r}")


def convert_fla_mom_state_dict(
    state_dict: Mapping[str, torch.Tensor], fla_config: Mapping
) -> tuple[MoMConfig, dict[str, torch.Tensor]]:
    """(their config.json dict, their weights) -> (MoMConfig, our state dict for MoMForCausalLM).

    Raises ValueError on unsupported options, unknown or missing keys, and shape mismatches.
    """
    config = config_from_fla(fla_config)
    source = dict(state_dict)
    if not any(key.startswith("model.") for key in source):  # a bare MomModel checkpoint
        source = {f"model.{key}": value for key, value in source.items()}
    converted: dict[str, torch.Tensor] = {}
    for layer_idx in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer_idx}."
        source.pop(prefix + "attn.D", None)  # official MoM: a Mamba-style skip weight its forward never reads
        for ours, shared in _STACKED.items():
            rows = _stacked_rows(source, prefix + "attn.", ours, shared, config)
            if rows:
                converted[prefix + "attn." + ours] = torch.stack(rows)
        _split_fused_mlp(source, prefix + "mlp.", config.intermediate_size)
    for key, tensor in source.items():  # every remaining key keeps its name
        if key.endswith("_conv1d.weight") and tensor.dim() == 2:  # (C, W) filters -> our Conv1d (C, 1, W)
            tensor = tensor.unsqueeze(1)
        converted[key] = tensor
    if config.tie_word_embeddings and "model.embeddings.weight" in converted:
        converted["lm_head.weight"] = converted["model.embeddings.weight"]  # one tensor under both names
    _check_against_model(converted, config)
    return config, converted


def _split_fused_mlp(source: dict, prefix: str, intermediate_size: int) -> None:
    """Official MoM's gate_proj (2I, D) holds [gate; up] (chunked in forward): split it into ours."""
    fused = source.get(prefix + "gate_proj.weight")
    if fused is not None and prefix + "up_proj.weight" not in source and fused.shape[0] == 2 * intermediate_size:
        gate, up = fused.chunk(2, dim=0)
        source[prefix + "gate_proj.weight"], source[prefix + "up_proj.weight"] = gate.clone(), up.clone()


def _stacked_rows(source: dict, prefix: str, ours: str, shared: str, config: MoMConfig) -> list[torch.Tensor]:
    """Pop the per-memory rows of one stacked projection (routed memories first, then the shared one)."""
    keys = [] if config.single_kv_proj else [f"{prefix}{ours}.{i}.weight" for i in range(config.num_memories)]
    if config.single_kv_proj or config.shared_mem:
        keys.append(f"{prefix}{shared}.weight")
    present = [key in source for key in keys]
    if not any(present):
        return []  # e.g. no b_proj / a_proj in this rule; the model check reports real omissions
    if not all(present):
        missing = [key for key, found in zip(keys, present) if not found]
        raise ValueError(f"checkpoint is missing per-memory weights: {missing}")
    return [source.pop(key) for key in keys]


def _check_against_model(converted: dict[str, torch.Tensor], config: MoMConfig) -> None:
    """Compare names and shapes with a (meta-device) MoMForCausalLM built from `config`."""
    with torch.device("meta"):
        expected = MoMForCausalLM(config).state_dict()
    unknown = sorted(set(converted) - set(expected))
    missing = sorted(set(expected) - set(converted))
    if unknown:
        raise ValueError(f"unknown keys in the fla checkpoint (not convertible): {unknown[:10]}")
    if missing:
        raise ValueError(f"keys missing from the fla checkpoint: {missing[:10]}")
    for key, tensor in converted.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"shape of {key} is {tuple(tensor.shape)}, expected {tuple(expected[key].shape)} for this config"
            )


def load_state_dict(src_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of an HF checkpoint folder: model.safetensors, sharded safetensors, or pytorch_model*.bin."""
    src = Path(src_dir)
    index_files = [src / "model.safetensors.index.json", src / "pytorch_model.bin.index.json"]
    for index_file in index_files:
        if index_file.exists():
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_file(src / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).exists():
            return _load_file(src / name)
    raise ValueError(f"src_dir must hold model.safetensors or pytorch_model.bin (or a sharded index): {src}")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file; ValueError naming it when it is damaged or not a weights file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors' and pickle's many errors for a damaged file
        raise ValueError(f"'{path}' could not be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); it is damaged or not a weights "
                         "file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}' does not hold a dict of tensors")
    return state


def convert_checkpoint(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> MoMForCausalLM:
    """Read an fla MoM checkpoint folder (config.json + weights), write our save_pretrained folder (safetensors).

    dst_dir is built beside itself and swapped in whole (memmix.files.atomic_replace_dir): a crash, Ctrl-C or kill
    leaves the old dst_dir or the complete new one. A dst_dir that is, holds or lies in src_dir is refused, and so
    is an existing dst_dir that holds anything but a model folder.
    """
    src = Path(src_dir)
    check_outputs_apart({"DST": (os.fspath(dst_dir), True)}, {"SRC": os.fspath(src_dir)})
    _check_replaceable(Path(dst_dir))
    config_file = src / "config.json"
    if not config_file.exists():
        raise ValueError(f"src_dir must contain config.json: {src}")
    try:
        fla_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"'{config_file}' is not a JSON file ({exc})") from None
    if not isinstance(fla_config, dict):
        raise ValueError(f"'{config_file}' must hold a JSON object")
    config, state = convert_fla_mom_state_dict(load_state_dict(src), fla_config)
    model = MoMForCausalLM(config)
    model.load_state_dict(state, strict=True)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    _save_atomically(model, Path(dst_dir))
    return model


def _check_replaceable(dst: Path) -> None:
    """dst is replaced whole: it must be new, empty, or a saved model folder (config.json), never other files."""
    if not dst.is_dir():
        return
    entries = [p.name for p in dst.iterdir() if not p.name.startswith(".")]
    if entries and "config.json" not in entries:
        raise InputError(f"'{dst}' holds other files (e.g. '{entries[0]}'), and convert replaces the whole folder; "
                         "pass a new or empty folder, or a model folder to replace", "DST")


def _save_atomically(model: MoMForCausalLM, dst: Path) -> None:
    """save_pretrained into a folder that replaces dst whole (never a mix of old and new files)."""
    atomic_replace_dir(dst, lambda folder: model.save_pretrained(folder, safe_serialization=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m memmix.convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="fla MomForCausalLM checkpoint folder (config.json + weights)")
    parser.add_argument("dst", help="output folder for memmix's save_pretrained checkpoint")
    args = parser.parse_args(argv)
    model = convert_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}: {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
