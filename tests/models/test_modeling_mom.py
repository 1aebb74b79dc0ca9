"""MoMForCausalLM: cached decoding, generate(), padding, packing, losses, gradients, save/load, Auto classes."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from memmix.models import MoMForCausalLM, MoMModel, causal_lm_loss
from memmix.routing import load_balancing_loss

from models_helpers import output_cache, random_ids, step_by_step, tiny_model, tiny_mom_config

TOL = dict(rtol=1e-9, atol=1e-10)

DECODE_CASES = {
    "gated_delta-shared-k1": dict(memory_rule="gated_delta", shared_mem=True, topk=1),
    "gated_delta-noshared-kM": dict(memory_rule="gated_delta", shared_mem=False, topk=3),
    "delta-shared-k2": dict(memory_rule="delta", topk=2),
    "gla-noshared-k1": dict(memory_rule="gla", shared_mem=False, topk=1),
    "linear-shared-kM": dict(memory_rule="linear", topk=3),
    "single_kv_proj": dict(single_kv_proj=True, use_output_gate=False),
    "hybrid-gqa": dict(num_hidden_layers=3, attn_layers=[1], attn_num_kv_heads=1),
    "hybrid-window": dict(attn_layers=[0], attn_window_size=4),
    "transformer": dict(attn_layers=[0, 1]),
}
HYBRID = dict(num_hidden_layers=3, attn_layers=[1], attn_window_size=5, attn_num_kv_heads=1)


@pytest.mark.parametrize("overrides", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_cached_decoding_reproduces_full_forward(overrides):
    model = tiny_model(seed=1, **overrides)
    ids = random_ids(2, 17, seed=2)  # 17 > the layer's dense-layout limit: full pass and steps take different paths
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        torch.testing.assert_close(step_by_step(model, ids, prefill=5), full, **TOL)


def test_greedy_generate_with_and_without_cache_agree():
    model = tiny_model(seed=3, **HYBRID)
    prompt = random_ids(2, 6, seed=4)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 14)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def test_beam_search_with_and_without_cache_agree():
    model = tiny_model(seed=5, **HYBRID)
    prompt = random_ids(2, 5, seed=6)
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (4, 9)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def _left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors with 0: ids (B, T_max) and mask (B, T_max)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


def test_left_padded_batch_generates_what_each_sequence_generates_alone():
    model = tiny_model(seed=7, **HYBRID)
    sequences = [random_ids(1, n, seed=10 + n)[0] for n in (4, 8, 6)]
    ids, mask = _left_pad(sequences)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, seq in enumerate(sequences):
        alone = model.generate(seq[None], max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(batch[row, ids.shape[1] :], alone[0, len(seq) :], rtol=0, atol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_logits_equal_unpadded(side):
    model = tiny_model(seed=8, **HYBRID)
    lengths = (5, 11, 8)
    sequences = [random_ids(1, n, seed=20 + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.full((len(lengths), width), 7)  # pads hold a real token id: the mask alone must hide them
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols], mask[row, cols] = seq, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=False).logits
        for row, seq in enumerate(sequences):
            alone = model(seq[None], use_cache=False).logits[0]
            torch.testing.assert_close(batch[row][mask[row].bool()], alone, **TOL)


def test_left_padded_prefill_then_decode_equals_unpadded():
    model = tiny_model(seed=9, **HYBRID)
    sequences = [random_ids(1, n, seed=30 + n)[0] for n in (3, 9)]
    ids, mask = _left_pad(sequences)
    extra = random_ids(2, 3, seed=31)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, step_logits = output_cache(out), []
        for t in range(extra.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = model(extra[:, t : t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = output_cache(out)
            step_logits.append(out.logits)
        step_logits = torch.cat(step_logits, dim=1)
        for row, seq in enumerate(sequences):
            alone = model(torch.cat([seq, extra[row]])[None], use_cache=False).logits[0, len(seq) :]
            torch.testing.assert_close(step_logits[row], alone, **TOL)


def test_packed_forward_equals_separate_documents():
    model = tiny_model(seed=11, **HYBRID)
    lengths = [4, 9, 1, 6]
    docs = [random_ids(1, n, seed=40 + i)[0] for i, n in enumerate(lengths)]
    packed = torch.cat(docs)[None]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        logits = model(packed, cu_seqlens=cu_seqlens, use_cache=False).logits[0]
        for doc, start, end in zip(docs, cu_seqlens[:-1], cu_seqlens[1:]):
            alone = model(doc[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[start:end], alone, **TOL)


def test_packed_loss_never_predicts_across_documents():
    model = tiny_model(seed=12, **HYBRID)
    lengths = [5, 7, 3]
    docs = [random_ids(1, n, seed=50 + i)[0] for i, n in enumerate(lengths)]
    packed = torch.cat(docs)[None]
    cu_seqlens = torch.tensor([0, 5, 12, 15])
    with torch.no_grad():
        loss = model(packed, cu_seqlens=cu_seqlens, labels=packed, use_cache=False).loss
        total, count = 0.0, 0
        for doc in docs:
            logits = model(doc[None], use_cache=False).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], doc[1:], reduction="sum")
            count += len(doc) - 1
    torch.testing.assert_close(loss, total / count, **TOL)


def test_loss_is_shifted_cross_entropy_ignoring_pads_and_minus_100():
    model = tiny_model(seed=13)
    ids = random_ids(2, 9, seed=60)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = ids.clone()
    labels[1, 3] = -100
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
    targets = labels[:, 1:].clone()
    targets[0, 5:] = -100  # targets at padded positions are ignored
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                                 targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, **TOL)
    torch.testing.assert_close(causal_lm_loss(out.logits, labels, mask), expected, **TOL)


def test_training_loss_adds_scaled_aux_loss():
    model = tiny_model(seed=14, aux_loss_scale=0.5)
    ids = random_ids(2, 10, seed=61)
    model.eval()
    eval_out = model(ids, labels=ids, use_cache=False)
    model.train()
    train_out = model(ids, labels=ids)
    assert output_cache(train_out) is None  # training forwards keep no cache by default
    ce = causal_lm_loss(train_out.logits, ids)
    torch.testing.assert_close(eval_out.loss, ce, **TOL)
    torch.testing.assert_close(train_out.loss, ce + 0.5 * train_out.aux_loss, **TOL)


def test_aux_loss_positive_finite_and_ignores_pads():
    model = tiny_model(seed=15, num_hidden_layers=3, attn_layers=[2])
    lengths = (4, 9)
    sequences = [random_ids(1, n, seed=70 + n)[0] for n in lengths]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2, 9, 3)
        assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
        other_pads = ids.masked_fill(mask == 0, 13)
        again = model(other_pads, attention_mask=mask, output_router_logits=True, use_cache=False).aux_loss
        torch.testing.assert_close(again, out.aux_loss, **TOL)
        # Pooled over real tokens only: the same as the loss over the unpadded sequences laid end to end.
        alone = [model(s[None], output_router_logits=True, use_cache=False).router_logits for s in sequences]
        joined = tuple(torch.cat([a[layer] for a in alone], dim=1) for layer in range(2))
        expected = load_balancing_loss(joined, 3, 2, mode="global")
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gradients_reach_every_parameter(tie):
    model = tiny_model(seed=16, dtype=torch.float32, tie_word_embeddings=tie, **HYBRID).train()
    ids = random_ids(3, 12, seed=80)
    model(ids, labels=ids).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert dead == []


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 9, seed=81)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=17, **HYBRID).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, **TOL, msg=name)


def test_inputs_embeds_and_tuple_output():
    model = tiny_model(seed=18, **HYBRID)
    ids = random_ids(2, 7, seed=82)
    with torch.no_grad():
        from_ids = model(ids, use_cache=False).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), use_cache=False).logits
        as_tuple = model(ids, use_cache=False, return_dict=False)
        hidden = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    torch.testing.assert_close(from_embeds, from_ids, **TOL)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], from_ids, **TOL)
    assert len(hidden) == model.config.num_hidden_layers + 1


def test_logits_to_keep_returns_the_last_positions():
    model = tiny_model(seed=19)
    ids = random_ids(2, 8, seed=83)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        last = model(ids, use_cache=False, logits_to_keep=2).logits
    torch.testing.assert_close(last, full[:, -2:], **TOL)


def test_bad_inputs_raise():
    model = tiny_model(seed=20)
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="cu_seqlens needs batch size 1"):
        model(ids, cu_seqlens=torch.tensor([0, 6]), use_cache=False)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D, start at 0 and end at T=6"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 5]), use_cache=False)
    with pytest.raises(ValueError, match="strictly increasing"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 3, 3, 6]), use_cache=False)
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 2, 6]), use_cache=True)
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        model(ids, attention_mask=torch.ones(2, 1, 6))


def test_cache_state_size_is_constant_and_matches_helper():
    model = tiny_model(seed=21, expand_v=2.0)
    sizes = []
    for length in (3, 17):
        with torch.no_grad():
            cache = output_cache(model(random_ids(2, length), use_cache=True))
        sizes.append(cache.num_floats() // 2)
    assert sizes[0] == sizes[1] == model.recurrent_state_size()
    config = model.config
    memory = 2 * (config.num_memories + 1) * config.num_heads * config.head_dim * config.head_dim * 2
    assert model.recurrent_state_size(include_conv=False) == memory


def test_hybrid_state_size_counts_the_kv_cache():
    model = tiny_model(seed=22, num_hidden_layers=3, attn_layers=[1], attn_num_kv_heads=1)
    with pytest.raises(ValueError, match="context_length is required"):
        model.recurrent_state_size()
    with torch.no_grad():
        cache = output_cache(model(random_ids(1, 9), use_cache=True))
    assert cache.num_floats() == model.recurrent_state_size(context_length=9)


def test_cache_reorder_and_select_follow_the_batch():
    model = tiny_model(seed=23, **HYBRID)
    ids = random_ids(3, 6, seed=84)
    nxt = random_ids(3, 1, seed=85)
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
        order = torch.tensor([2, 0, 2])
        cache.reorder_cache(order)
        reordered = model(nxt[order], past_key_values=cache, use_cache=True).logits
        expected = model(torch.cat([ids[order], nxt[order]], dim=1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(reordered, expected, **TOL)
    assert cache.batch_size == 3
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_load_round_trip_and_auto_classes(tmp_path, tie):
    model = tiny_model(seed=24, tie_word_embeddings=tie, **HYBRID)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).attn_layers == [1]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(loaded) is MoMForCausalLM
    assert (loaded.lm_head.weight is loaded.model.embeddings.weight) == tie
    ids = random_ids(2, 7, seed=86)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(base) is MoMModel
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0)


def test_auto_classes_from_config():
    config = tiny_mom_config()
    settings = {k: v for k, v in config.to_diff_dict().items() if k not in ("model_type", "transformers_version")}
    assert AutoConfig.for_model("memmix_mom", **settings).to_dict() == config.to_dict()
    assert type(AutoModelForCausalLM.from_config(config)) is MoMForCausalLM
    assert type(AutoModel.from_config(config)) is MoMModel


def test_low_memory_reaches_every_mom_layer_and_survives_save_load(tmp_path):
    model = tiny_model(seed=25, low_memory=True, **HYBRID)
    mom_layers = [layer.attn for i, layer in enumerate(model.model.layers) if i not in HYBRID["attn_layers"]]
    assert mom_layers and all(layer.low_memory for layer in mom_layers)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.config.low_memory and loaded.model.layers[0].attn.low_memory


def test_routing_outputs_are_the_block_outputs_routing_fields():
    """The blocks loop collects ROUTING_OUTPUTS by name: every BlockOutput field but hidden_states and state."""
    from dataclasses import fields

    from memmix.models.base import ROUTING_OUTPUTS, BlockOutput

    assert ROUTING_OUTPUTS == tuple(f.name for f in fields(BlockOutput) if f.name not in ("hidden_states", "state"))
