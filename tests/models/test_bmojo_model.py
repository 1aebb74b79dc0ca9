"""BMojoForCausalLM: cached decoding, generate(), padding, packing, loss, gradients, save/load, Auto classes."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import memmix
from memmix.layers import BMojoState
from memmix.models.configuration_bmojo import BMojoConfig
from memmix.models.modeling_bmojo import BMojoForCausalLM, BMojoModel
from memmix.models.presets import BMOJO_PRESETS, bmojo_recall_config, build_model

from models_helpers import random_ids, step_by_step, tiny_bmojo, tiny_f

TOL = dict(rtol=1e-9, atol=1e-10)




@pytest.mark.parametrize("overrides", [dict(), dict(fading_rule="gla", eviction="fifo"),
                                       dict(eidetic_size=0, eidetic_per_chunk=0)])
def test_cached_decoding_reproduces_full_forward(overrides):
    model = tiny_bmojo(seed=1, **overrides)
    ids = random_ids(2, 17, seed=2)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        torch.testing.assert_close(step_by_step(model, ids), full, **TOL)
        torch.testing.assert_close(step_by_step(model, ids, prefill=7), full, **TOL)
        assert all(isinstance(s, BMojoState) for s in model(ids, use_cache=True).cache.layer_states)


def test_greedy_generate_with_and_without_cache_agree():
    model = tiny_bmojo(seed=3)
    prompt = random_ids(2, 6, seed=4)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, uncached)


def test_beam_search_with_and_without_cache_agree():
    model = tiny_bmojo(seed=5)
    prompt = random_ids(2, 5, seed=6)
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert cached.shape == (4, 9)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))


def test_left_padded_prefill_then_decode_equals_each_sequence_alone():
    model = tiny_bmojo(seed=7)
    seqs = [random_ids(1, 11, seed=8)[0], random_ids(1, 5, seed=9)[0]]
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, 11 - len(seq):], mask[row, 11 - len(seq):] = seq, 1
    extra = random_ids(2, 4, seed=10)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, logits = out.cache, [out.logits]
        for t in range(4):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            step = model(extra[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = step.cache
            logits.append(step.logits)
        logits = torch.cat(logits, 1)
        for row, seq in enumerate(seqs):
            alone = model(torch.cat([seq, extra[row]])[None]).logits[0]
            torch.testing.assert_close(logits[row, 11 - len(seq):], alone, **TOL)


def test_packed_forward_and_loss_equal_separate_documents():
    model = tiny_bmojo(seed=11)
    docs = [random_ids(1, n, seed=12 + n)[0] for n in (4, 9, 6)]
    ids = torch.cat(docs)[None]
    cu = torch.tensor([0, 4, 13, 19])
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu, labels=ids, use_cache=False)
        losses, counts = [], []
        for i, doc in enumerate(docs):
            alone = model(doc[None], labels=doc[None])
            torch.testing.assert_close(packed.logits[0, cu[i]:cu[i + 1]], alone.logits[0], **TOL)
            losses.append(alone.loss * (len(doc) - 1))
            counts.append(len(doc) - 1)
        torch.testing.assert_close(packed.loss, sum(losses) / sum(counts), **TOL)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=cu, use_cache=True)


def test_gradients_reach_every_parameter():
    model = tiny_bmojo(seed=13).train()
    ids = random_ids(2, 14, seed=14)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_bmojo(seed=15).train()
    ids = random_ids(2, 10, seed=16)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], **TOL)


def test_cache_is_bounded_and_matches_the_size_helper():
    model = tiny_bmojo(seed=17)
    with torch.no_grad():
        sizes = [model(random_ids(1, n), use_cache=True).cache.num_floats() for n in (5, 30)]
    assert sizes[0] == sizes[1] == model.recurrent_state_size()


@pytest.mark.parametrize("build", [tiny_bmojo, tiny_f], ids=["store", "f"])
def test_cache_select_follows_the_batch(build):
    model = build(seed=18)
    ids = random_ids(3, 8, seed=19)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        cache.batch_select_indices(torch.tensor([2, 0]))
        nxt = random_ids(2, 1, seed=20)
        got = model(nxt, past_key_values=cache, use_cache=True).logits
        want = model(torch.cat([ids[[2, 0]], nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_and_auto_classes(tmp_path, tie):
    model = tiny_bmojo(seed=21, tie_word_embeddings=tie, eviction="fifo")
    ids = random_ids(2, 9, seed=22)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, BMojoConfig) and config.eviction == "fifo"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded, BMojoForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **TOL)
    assert isinstance(AutoModel.from_pretrained(tmp_path, dtype=torch.float64), BMojoModel)


def test_exports_presets_and_recall_builder():
    assert memmix.BMojoConfig is BMojoConfig and memmix.BMojoForCausalLM is BMojoForCausalLM
    for shape in BMOJO_PRESETS.values():
        BMojoConfig(vocab_size=100, **shape)
    tiny = build_model("bmojo-tiny", vocab_size=50, overrides=dict(eviction="fifo"), eos_token_id=3)
    assert isinstance(tiny, BMojoForCausalLM)
    assert tiny.config.eviction == "fifo" and tiny.config.pad_token_id == 3 and tiny.config.vocab_size == 50
    with pytest.raises(ValueError, match="unknown model preset 'bmojo-7b'; did you mean"):
        build_model("bmojo-7b", vocab_size=50)
    config = bmojo_recall_config(vocab_size=64, d_model=64, num_layers=2)
    assert config.num_heads == 2 and config.eidetic_size > 0
    with pytest.raises(ValueError, match="d_model"):
        bmojo_recall_config(vocab_size=64, d_model=48, num_layers=2)


@pytest.mark.parametrize("bad", [dict(fading_rule="ssm"), dict(window_size=0), dict(eviction="lru"),
                                 dict(impl="cuda"), dict(eidetic_per_chunk=5, chunk_size=4), dict(vocab_size=0),
                                 dict(use_cache="yes")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        BMojoConfig(**bad)
