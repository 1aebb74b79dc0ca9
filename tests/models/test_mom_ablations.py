"""The recall study's ablation options at the model level (MoMConfig router_z_loss, router_temperature,
router_input, conv_scope): decoding, generate(), padding, packing, the z-loss, the state size, save/load, and the
defaults staying the paper's MoM. The options against the naive reference: tests/layers/test_mom.py and
tests/ops/mom/test_mom_mixer.py; their errors: tests/models/test_configuration_mom.py."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from memmix.models import MoMConfig, MoMForCausalLM, causal_lm_loss

from helpers import hand_z_loss
from models_helpers import output_cache, random_ids, step_by_step, tiny_model

TOL = dict(rtol=1e-9, atol=1e-10)
HYBRID = dict(num_hidden_layers=3, attn_layers=[1], attn_window_size=5, attn_num_kv_heads=1)
# the options that change what the model computes and carries (router_z_loss only adds a loss term)
MIXING = {
    "route-conv": dict(router_input="conv"),
    "conv-whole": dict(conv_scope="sequence"),
    "temp": dict(router_temperature=2.0),
    "all-hybrid": dict(router_input="conv", conv_scope="sequence", router_temperature=0.5, **HYBRID),
}
FIELDS = {"router_z_loss": 0.0, "router_temperature": 1.0, "router_input": "token", "conv_scope": "segment"}


@pytest.mark.parametrize("overrides", MIXING.values(), ids=MIXING.keys())
def test_prefill_and_decoding_steps_reproduce_the_full_forward(overrides):
    model = tiny_model(seed=1, **overrides)
    ids = random_ids(2, 21, seed=2)  # 21 > the dense-layout limit: the full pass and the steps take different paths
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        torch.testing.assert_close(step_by_step(model, ids, prefill=6), full, **TOL)


@pytest.mark.parametrize("overrides", MIXING.values(), ids=MIXING.keys())
def test_left_padded_generation_and_packed_documents_equal_each_sequence_alone(overrides):
    model = tiny_model(seed=3, **overrides)
    sequences = [random_ids(1, n, seed=10 + n)[0] for n in (4, 9, 6)]
    width = max(len(s) for s in sequences)
    ids = torch.full((3, width), 7)  # pads hold a real token id: the mask alone must hide them
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):], mask[row, width - len(seq):] = seq, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, seq in enumerate(sequences):
        alone = model.generate(seq[None], max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(batch[row, width:], alone[0, len(seq):], rtol=0, atol=0)
    packed = torch.cat(sequences)[None]
    cu_seqlens = torch.tensor([0, 4, 13, 19])
    with torch.no_grad():
        logits = model(packed, cu_seqlens=cu_seqlens, use_cache=False).logits[0]
        for seq, start, end in zip(sequences, cu_seqlens[:-1], cu_seqlens[1:]):
            torch.testing.assert_close(logits[start:end], model(seq[None], use_cache=False).logits[0], **TOL)


@pytest.mark.parametrize("overrides", [dict(), *MIXING.values()], ids=["default", *MIXING.keys()])
def test_state_size_counts_what_the_cache_holds(overrides):
    model = tiny_model(seed=4, **{k: v for k, v in overrides.items() if k not in HYBRID})
    with torch.no_grad():
        cache = output_cache(model(random_ids(2, 9), use_cache=True))
    assert cache.num_floats() // 2 == model.recurrent_state_size()
    config = model.config
    router_tail = (config.conv_size - 1) * config.hidden_size * config.num_mom_layers
    extra = model.recurrent_state_size() - tiny_model(seed=4).recurrent_state_size()
    assert extra == (router_tail if config.router_input == "conv" else 0)  # conv_scope keeps the state's shape
    order = torch.tensor([1, 1, 0])
    cache.batch_select_indices(order)
    assert cache.num_floats() // 3 == model.recurrent_state_size()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_z_loss_is_added_in_training_and_matches_a_hand_computation(temperature):
    model = tiny_model(seed=5, aux_loss_scale=0.1, router_z_loss=0.01, router_temperature=temperature,
                       **HYBRID).train()
    ids = random_ids(2, 10, seed=6)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    ce = causal_lm_loss(out.logits, ids, mask)
    torch.testing.assert_close(out.loss, ce + 0.1 * out.aux_loss + 0.01 * out.z_loss, **TOL)
    assert out.z_loss.dtype == torch.float32 and len(out.router_logits) == 2  # the two MoM layers
    assert out.z_loss.item() == pytest.approx(hand_z_loss(out.router_logits, mask), rel=1e-6)
    # the router_logits are the tempered softmax input: the gate's logits / temperature
    with torch.no_grad():
        layer = model.model.layers[0]
        gate = layer.attn.gate(layer.attn_norm(model.model.embeddings(ids))).float()
    torch.testing.assert_close(out.router_logits[0], gate / temperature)
    # padded tokens change nothing; in evaluation the loss is the cross-entropy alone
    other = model(ids.masked_fill(mask == 0, 13), attention_mask=mask, labels=ids)
    torch.testing.assert_close(other.z_loss, out.z_loss, **TOL)
    model.eval()
    evaluated = model(ids, attention_mask=mask, labels=ids, use_cache=False)
    torch.testing.assert_close(evaluated.loss, ce, **TOL)
    assert evaluated.z_loss is not None  # reported with labels, as aux_loss
    out.loss.backward()
    assert model.model.layers[0].attn.gate.weight.grad.abs().sum() > 0


def test_without_a_z_loss_weight_the_output_is_what_it_was():
    """router_z_loss = 0: no z-loss is computed, the tuple output keeps its length, the loss is unchanged."""
    model = tiny_model(seed=7).train()
    ids = random_ids(2, 8, seed=8)
    out = model(ids, labels=ids)
    assert out.z_loss is None
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, ids) + 0.01 * out.aux_loss, **TOL)
    assert len(model(ids, labels=ids, return_dict=False)) == 3  # loss, logits, aux_loss
    weighted = tiny_model(seed=7, router_z_loss=0.5).train()
    assert len(weighted(ids, labels=ids, return_dict=False)) == 4


def test_every_parameter_trains_with_every_option():
    model = tiny_model(seed=9, dtype=torch.float32, router_z_loss=1e-3, **MIXING["all-hybrid"]).train()
    ids = random_ids(3, 19, seed=10)
    model(ids, labels=ids).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert dead == []
    assert any("router_conv1d" in name for name, _ in model.named_parameters())


def test_save_load_round_trip_keeps_every_option(tmp_path):
    options = dict(router_z_loss=1e-3, **MIXING["all-hybrid"])
    model = tiny_model(seed=11, **options)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert {name: getattr(config, name) for name in FIELDS} == {name: options[name] for name in FIELDS}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert set(loaded.state_dict()) == set(model.state_dict())
    layer = loaded.model.layers[0].attn
    assert (layer.router_input, layer.conv_scope, layer.router_temperature) == ("conv", "sequence", 0.5)
    ids = random_ids(2, 19, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_defaults_are_the_papers_mom():
    """The new fields default to the paper's semantics; a checkpoint saved before them loads with those defaults,
    and a model built with the defaults spelled out computes bit for bit what the plain config computes."""
    assert {name: getattr(MoMConfig(), name) for name in FIELDS} == FIELDS
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mom")
    assert {name: getattr(AutoConfig.from_pretrained(folder), name) for name in FIELDS} == FIELDS
    plain, spelled = tiny_model(seed=13), tiny_model(seed=13, **FIELDS)
    assert all(layer.attn.router_conv1d is None for layer in plain.model.layers)
    assert set(plain.state_dict()) == set(spelled.state_dict())
    ids = random_ids(2, 19, seed=14)
    plain.train(), spelled.train()
    a, b = plain(ids, labels=ids), spelled(ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    with torch.no_grad():
        cache = output_cache(plain.eval()(ids, use_cache=True))
    assert all(state.router_conv is None for state in cache.layer_states)
    assert isinstance(plain, MoMForCausalLM)
