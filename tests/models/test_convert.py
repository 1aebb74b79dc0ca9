"""memmix.convert on state dicts laid out like flash-linear-attention's MomForCausalLM (random values)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from memmix.convert import config_from_fla, convert_checkpoint, convert_fla_mom_state_dict, main
from memmix.models import MoMForCausalLM

from models_helpers import random_ids


def fla_config(**overrides) -> dict:
    """A config.json of fla's MomConfig for a tiny model."""
    config = dict(
        model_type="mom", attn_mode="chunk", hidden_size=16, num_hidden_layers=2, num_heads=2, head_dim=4,
        expand_v=1.0, num_memories=3, topk=2, capacity=1.0, shared_mem=True, single_kv_proj=False,
        use_output_gate=True, use_short_conv=True, conv_size=3, norm_eps=1e-6, vocab_size=41,
        hidden_ratio=4, intermediate_size=24, hidden_act="swish", attn=None, mom_backend="gated_deltanet",
        tie_word_embeddings=False, aux_loss_scale=0.01, use_layer_wise_balance=True, initializer_range=0.02,
        fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True, bos_token_id=1, eos_token_id=2,
    )
    config.update(overrides)
    return config


def fla_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under fla's MoM key names and shapes."""
    generator = torch.Generator().manual_seed(seed)
    D, H, K, M = config["hidden_size"], config["num_heads"], config["head_dim"], config["num_memories"]
    Kd, Vd, V, W = H * K, int(H * K * config["expand_v"]), int(K * config["expand_v"]), config["conv_size"]
    I, vocab = config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embeddings.weight": (vocab, D), "model.norm.weight": (D,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, D)
    per_memory = {"k": (Kd, D), "v": (Vd, D), "b": (H, D), "a": (H, D)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "attn_norm.weight": (D,), p + "mlp_norm.weight": (D,), p + "mlp.gate_proj.weight": (I, D),
            p + "mlp.up_proj.weight": (I, D), p + "mlp.down_proj.weight": (D, I), p + "attn.q_proj.weight": (Kd, D),
            p + "attn.gate.weight": (M, D), p + "attn.A_log": (H,), p + "attn.dt_bias": (H,),
            p + "attn.q_conv1d.weight": (Kd, 1, W), p + "attn.k_conv1d.weight": (Kd, 1, W),
            p + "attn.v_conv1d.weight": (Vd, 1, W), p + "attn.o_norm.weight": (V,), p + "attn.o_proj.weight": (D, Vd),
        })
        if config["use_output_gate"]:
            shapes[p + "attn.g_proj.weight"] = (Vd, D)
        for name, shape in per_memory.items():
            if not config["single_kv_proj"]:
                shapes.update({f"{p}attn.{name}_proj.{j}.weight": shape for j in range(M)})
            if config["single_kv_proj"] or config["shared_mem"]:
                shapes[f"{p}attn.shared_{name}.weight"] = shape
    return {key: 0.3 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


VARIANTS = {
    "shared": dict(),
    "no-shared": dict(shared_mem=False, topk=1),
    "single-kv": dict(single_kv_proj=True, use_output_gate=False),
    "tied-expand-v": dict(tie_word_embeddings=True, expand_v=2.0),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_weights_land_where_expected(overrides):
    config_dict = fla_config(**overrides)
    source = fla_state_dict(config_dict)
    config, converted = convert_fla_mom_state_dict(source, config_dict)
    assert (config.num_memories, config.topk, config.shared_mem, config.single_kv_proj) == (
        3, config_dict["topk"], config_dict["shared_mem"], config_dict["single_kv_proj"])
    assert config.memory_rule == "gated_delta" and config.intermediate_size == 24 and config.norm_eps == 1e-6
    for layer in range(2):
        p = f"model.layers.{layer}.attn."
        for name in ("k", "v", "b", "a"):
            stacked = converted[f"{p}{name}_proj"]
            rows = [] if config.single_kv_proj else [source[f"{p}{name}_proj.{j}.weight"] for j in range(3)]
            if config.single_kv_proj or config.shared_mem:
                rows.append(source[f"{p}shared_{name}.weight"])  # the shared memory is the last row
            assert stacked.shape[0] == len(rows)
            for row, expected in zip(stacked, rows):
                assert torch.equal(row, expected)
        for name in ("q_proj.weight", "gate.weight", "A_log", "dt_bias", "k_conv1d.weight", "o_norm.weight"):
            assert torch.equal(converted[p + name], source[p + name])
    if config.tie_word_embeddings:
        assert converted["lm_head.weight"] is converted["model.embeddings.weight"]


def _hand_built(config, source: dict) -> MoMForCausalLM:
    """Our model with every weight copied from fla's names by explicit attribute paths."""
    model = MoMForCausalLM(config).double().eval()
    with torch.no_grad():
        model.model.embeddings.weight.copy_(source["model.embeddings.weight"])
        model.model.norm.weight.copy_(source["model.norm.weight"])
        if not config.tie_word_embeddings:
            model.lm_head.weight.copy_(source["lm_head.weight"])
        for i, block in enumerate(model.model.layers):
            p = f"model.layers.{i}."
            block.attn_norm.weight.copy_(source[p + "attn_norm.weight"])
            block.mlp_norm.weight.copy_(source[p + "mlp_norm.weight"])
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block.mlp, name).weight.copy_(source[f"{p}mlp.{name}.weight"])
            mom = block.attn
            for name in ("q_proj", "gate", "o_proj", "q_conv1d", "k_conv1d", "v_conv1d", "o_norm", "g_proj"):
                if hasattr(mom, name):
                    getattr(mom, name).weight.copy_(source[f"{p}attn.{name}.weight"])
            mom.A_log.copy_(source[p + "attn.A_log"])
            mom.dt_bias.copy_(source[p + "attn.dt_bias"])
            for name in ("k", "v", "b", "a"):
                stacked = getattr(mom, f"{name}_proj")
                if config.single_kv_proj:
                    stacked[0] = source[f"{p}attn.shared_{name}.weight"]
                    continue
                for j in range(config.num_memories):
                    stacked[j] = source[f"{p}attn.{name}_proj.{j}.weight"]
                if config.shared_mem:
                    stacked[config.num_memories] = source[f"{p}attn.shared_{name}.weight"]
    return model


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_model_matches_hand_built_model(overrides):
    config_dict = fla_config(**overrides)
    source = fla_state_dict(config_dict, seed=1)
    config, converted = convert_fla_mom_state_dict(source, config_dict)
    model = MoMForCausalLM(config).double().eval()
    model.load_state_dict(converted, strict=True)
    ids = random_ids(2, 9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _hand_built(config, source)(ids).logits, rtol=0, atol=0)


def test_convert_checkpoint_folder_and_cli(tmp_path):
    config_dict = fla_config()
    source = fla_state_dict(config_dict, seed=2)
    src = tmp_path / "fla"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config_dict))
    save_file(source, str(src / "model.safetensors"))
    converted = convert_checkpoint(src, tmp_path / "ours")
    loaded = MoMForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = random_ids(1, 6, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, converted.eval()(ids).logits, rtol=0, atol=0)
    assert not [p for p in (tmp_path / "ours").iterdir() if p.name.startswith(".convert-")]

    bin_src = tmp_path / "fla_bin"
    bin_src.mkdir()
    (bin_src / "config.json").write_text(json.dumps(config_dict))
    torch.save(source, bin_src / "pytorch_model.bin")
    main([str(bin_src), str(tmp_path / "ours_bin")])
    from_bin = MoMForCausalLM.from_pretrained(tmp_path / "ours_bin").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_bin(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_official_mom_layout_converts_like_fla():
    """OpenSparseLLMs/MoM: renamed config keys, fused (2I, D) gate_proj = [gate; up], an unused attn.D."""
    config_dict = fla_config(expand_v=2.0)
    source = fla_state_dict(config_dict, seed=5)
    official_config = {k: v for k, v in config_dict.items() if k not in ("num_memories", "single_kv_proj",
                                                                          "use_output_gate", "mom_backend")}
    official_config.update(model_type="mom_gated_deltanet", num_experts=3, single_expert=False, use_gate=True,
                           norm_first=False)
    official = dict(source)
    for layer in range(2):
        p = f"model.layers.{layer}."
        gate, up = official.pop(p + "mlp.gate_proj.weight"), official.pop(p + "mlp.up_proj.weight")
        official[p + "mlp.gate_proj.weight"] = torch.cat([gate, up])
        official[p + "attn.D"] = torch.ones(2)
    config, converted = convert_fla_mom_state_dict(official, official_config)
    expected_config, expected = convert_fla_mom_state_dict(source, config_dict)
    assert config.to_dict() == expected_config.to_dict()
    assert converted.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key
    with pytest.raises(ValueError, match="norm_first must be False"):
        config_from_fla({**official_config, "norm_first": True})
    assert config_from_fla({"model_type": "mom_gated_deltanet", "intermediate_size": 8}).num_memories == 8


def test_intermediate_size_follows_fla_rule_when_unset():
    assert config_from_fla(fla_config(hidden_size=1024, intermediate_size=None)).intermediate_size == 2816
    assert config_from_fla(fla_config(hidden_size=64, intermediate_size=None, hidden_ratio=2)).intermediate_size == 256


def test_bad_state_dicts_raise():
    config_dict = fla_config()
    source = fla_state_dict(config_dict)
    with pytest.raises(ValueError, match=r"unknown keys .*model.layers.0.attn.extra.weight"):
        convert_fla_mom_state_dict({**source, "model.layers.0.attn.extra.weight": torch.zeros(1)}, config_dict)
    partial = {k: v for k, v in source.items() if k != "model.layers.1.attn.v_proj.2.weight"}
    with pytest.raises(ValueError, match=r"missing per-memory weights: \['model.layers.1.attn.v_proj.2.weight'\]"):
        convert_fla_mom_state_dict(partial, config_dict)
    partial = {k: v for k, v in source.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"keys missing from the fla checkpoint: \['model.norm.weight'\]"):
        convert_fla_mom_state_dict(partial, config_dict)
    wrong = {**source, "model.layers.0.attn.A_log": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"shape of model.layers.0.attn.A_log is \(5,\), expected \(2,\)"):
        convert_fla_mom_state_dict(wrong, config_dict)


UNSUPPORTED = [
    (dict(capacity=0.5), r"capacity must be 1.0"),
    (dict(attn={"layers": [1], "num_heads": 2}), r"attn must be None"),
    (dict(mom_backend="gla"), r"mom_backend must be 'gated_deltanet'"),
    (dict(use_short_conv=False), r"use_short_conv must be True"),
    (dict(hidden_act="gelu"), r"hidden_act must be 'swish' or 'silu'"),
    (dict(attnres_block_size=2), r"attnres_block_size must be None"),
    (dict(model_type="gla"), r"model_type must be 'mom'"),
]


@pytest.mark.parametrize("overrides, message", UNSUPPORTED, ids=[m.split(" ")[0] for _, m in UNSUPPORTED])
def test_unsupported_fla_options_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_fla(fla_config(**overrides))
