"""MoMConfig: defaults, serialisation and one failing case per validated argument."""
from __future__ import annotations

import pytest

from memmix.models import MoMConfig


def test_defaults_and_intermediate_size_rule():
    config = MoMConfig(hidden_size=1024)
    assert config.model_type == "memmix_mom"
    assert config.intermediate_size == 2816  # int(1024 * 8 / 3) = 2730, rounded up to a multiple of 256
    assert MoMConfig(hidden_size=96).intermediate_size == 256
    assert config.attn_layers == [] and config.num_mom_layers == config.num_hidden_layers
    assert config.attn_num_heads == config.num_heads and config.attn_num_kv_heads == config.attn_num_heads


def test_attention_head_split_is_only_checked_when_there_are_attention_layers():
    assert MoMConfig(hidden_size=2048, num_heads=6).attn_num_heads == 6  # 2048 / 6 is fine without attention
    with pytest.raises(ValueError, match="attn_num_heads must divide hidden_size=2048"):
        MoMConfig(hidden_size=2048, num_heads=6, attn_layers=[0])


def test_attn_layers_sorted_and_round_trip():
    config = MoMConfig(num_hidden_layers=4, hidden_size=64, attn_layers=[3, 1], attn_num_heads=4, attn_num_kv_heads=2)
    assert config.attn_layers == [1, 3]
    assert config.is_attention_layer(3) and not config.is_attention_layer(0)
    again = MoMConfig.from_dict(config.to_dict())
    assert again.attn_layers == [1, 3] and again.attn_num_kv_heads == 2 and again.to_dict() == config.to_dict()


BAD_ARGUMENTS = [
    (dict(vocab_size=0), r"vocab_size must be an integer >= 1"),
    (dict(hidden_size=-4), r"hidden_size must be an integer >= 1"),
    (dict(hidden_size=True), r"hidden_size must be an integer >= 1, got True"),
    (dict(num_hidden_layers=0), r"num_hidden_layers must be an integer >= 1"),
    (dict(intermediate_size=0), r"intermediate_size must be an integer >= 1"),
    # the MoM layer's arguments: their types here, their values by the layer's own check
    (dict(num_heads=0), r"num_heads must be a positive integer"),
    (dict(head_dim=2.5), r"head_dim must be an integer, got 2.5"),
    (dict(expand_v="1"), r"expand_v must be a number, got '1'"),
    (dict(expand_v=0), r"expand_v must be positive with head_dim \* expand_v an integer"),
    (dict(head_dim=3, expand_v=0.5), r"expand_v must be positive with head_dim \* expand_v an integer"),
    (dict(num_memories=0), r"num_memories must be a positive integer"),
    (dict(topk=1.5), r"topk must be an integer, got 1.5"),
    (dict(num_memories=4, topk=5), r"topk must be in \[1, num_memories=4\], got 5"),
    (dict(topk=0), r"topk must be in \[1, num_memories=4\], got 0"),
    (dict(shared_mem="yes"), r"shared_mem must be True or False"),
    (dict(single_kv_proj=1), r"single_kv_proj must be True or False"),
    (dict(use_output_gate=None), r"use_output_gate must be True or False"),
    (dict(tie_word_embeddings="no"), r"tie_word_embeddings must be True or False"),
    (dict(use_cache=0), r"use_cache must be True or False"),
    (dict(low_memory="yes"), r"low_memory must be True or False"),
    (dict(memory_rule="mamba"), r"memory_rule must be one of \('gated_delta', 'delta', 'gla', 'linear'\)"),
    (dict(conv_size=1), r"conv_size must be an integer >= 2"),
    (dict(norm_eps=0.0), r"norm_eps must be a number > 0"),
    (dict(initializer_range=-0.1), r"initializer_range must be a number > 0"),
    (dict(aux_loss_scale=-1.0), r"aux_loss_scale must be a number >= 0"),
    (dict(aux_loss_mode="mean"), r"aux_loss_mode must be one of \['global', 'layerwise'\]"),
    (dict(router_z_loss=-1e-3), r"router_z_loss must be a number >= 0, got -0.001"),
    (dict(router_z_loss="0.1"), r"router_z_loss must be a number >= 0, got '0.1'"),
    (dict(router_temperature=0), r"router_temperature must be a number > 0, got 0"),
    (dict(router_temperature=True), r"router_temperature must be a number > 0, got True"),
    (dict(router_input="hidden"), r"router_input must be one of \['token', 'conv'\], got 'hidden'"),
    (dict(conv_scope=None), r"conv_scope must be one of \['segment', 'sequence'\], got None"),
    (dict(impl="cuda"), r"impl must be one of \['auto', 'recurrent', 'chunk', 'triton'\]"),
    (dict(num_hidden_layers=3, attn_layers=[3]), r"attn_layers indices must be integers in \[0, num_hidden_layers=3\)"),
    (dict(attn_layers=[-1]), r"attn_layers indices must be integers in \[0, num_hidden_layers=24\)"),
    (dict(attn_layers=[1, 1]), r"attn_layers must not repeat an index"),
    (dict(attn_layers=5), r"attn_layers must be a list of layer indices"),
    (dict(hidden_size=64, attn_num_heads=0), r"attn_num_heads must be an integer >= 1"),
    (dict(hidden_size=64, attn_layers=[0], attn_num_heads=3),
     r"attn_num_heads must divide hidden_size=64 into an even head size"),
    (dict(hidden_size=64, attn_layers=[0], attn_num_heads=64),
     r"attn_num_heads must divide hidden_size=64 into an even head size"),
    (dict(hidden_size=64, attn_num_heads=4, attn_num_kv_heads=0), r"attn_num_kv_heads must be an integer >= 1"),
    (dict(hidden_size=64, attn_num_heads=4, attn_num_kv_heads=3),
     r"attn_num_kv_heads must be a positive divisor of attn_num_heads=4"),
    (dict(rope_theta=0), r"rope_theta must be a number > 0"),
    (dict(attn_window_size=0), r"attn_window_size must be an integer >= 1"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS, ids=[next(iter(k)) for k, _ in BAD_ARGUMENTS])
def test_every_argument_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoMConfig(**kwargs)
