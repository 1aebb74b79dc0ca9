"""BMojoForCausalLM with variant="f" (every mixer a BMojoF), in float64: loss == cross-entropy of the logits,
loss_positions == the full head, padding and packed documents == each sequence alone, cached decoding and
generate() == the no-cache forward, save/load and the Auto classes, the state size formula, presets and config
errors, no host synchronisation in a training step."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import memmix  # noqa: F401  (registers the Auto classes)
from memmix.layers import BMojoF, BMojoFState
from memmix.models.cache import LayerStateCache
from memmix.models.configuration_bmojo import BMojoConfig
from memmix.models.modeling_bmojo import BMojoForCausalLM, BMojoModel
from memmix.models.presets import BMOJO_PRESETS, bmojo_f_recall_config, build_model
from memmix.host_syncs import find_host_syncs

from models_helpers import VOCAB, random_ids, tiny_f

TOL = dict(rtol=1e-9, atol=1e-10)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


VARIANTS = {
    "default": {},
    "gqa-untied-qknorm": dict(num_heads=4, num_kv_heads=2, tie_attn_weights=False, qk_norm=True),
    "gla-no-rope-small-fading": dict(fading_rule="gla", rope_theta=None, fading_num_heads=1, fading_head_dim=6),
}


def left_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (B, T) padded on the left with the pad id 0, and their 0/1 mask."""
    T = max(len(s) for s in seqs)
    ids, mask = torch.zeros(len(seqs), T, dtype=torch.long), torch.zeros(len(seqs), T, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, T - len(seq):], mask[row, T - len(seq):] = seq, 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- training


def test_the_blocks_are_bmojo_f_and_the_loss_is_the_shifted_cross_entropy():
    model = tiny_f(seed=1)
    assert all(isinstance(block.attn, BMojoF) for block in model.model.layers)
    ids = random_ids(2, 11, seed=2)
    out = model(ids, labels=ids)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want, **TOL)


def test_loss_positions_equal_the_full_head_with_gradients():
    model = tiny_f(seed=3).train()
    ids = random_ids(2, 13, seed=4)
    positions = torch.tensor([[0, 5, 11], [3, 4, 9]])
    rows = torch.arange(2)[:, None]
    labels = torch.full_like(ids, -100)
    labels[rows, positions + 1] = ids[rows, positions + 1]
    results = []
    for extra in ({}, {"loss_positions": positions}):
        model.zero_grad()
        out = model(ids, labels=labels, use_cache=False, **extra)
        out.loss.backward()
        results.append((out, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (full, full_grads), (part, part_grads) = results
    torch.testing.assert_close(part.logits, full.logits[rows, positions], **TOL)
    torch.testing.assert_close(part.loss, full.loss, **TOL)
    for name, grad in full_grads.items():
        torch.testing.assert_close(part_grads[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(side):
    """Logits at real tokens and the loss (token-weighted over the rows) equal the unpadded sequences'."""
    model = tiny_f(seed=5, num_heads=4, num_kv_heads=2)
    seqs = [random_ids(1, 14, seed=6)[0], random_ids(1, 8, seed=7)[0]]
    ids, mask = left_padded(seqs)
    if side == "right":
        ids, mask = ids.flip(1), mask.flip(1)
        seqs = [s.flip(0) for s in seqs]
    labels = ids.clone()
    if side == "left":  # a pad position would predict the first real token: the loss masks targets, not inputs
        labels[torch.arange(2), mask.argmax(1)] = -100
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        total, count = 0.0, 0
        for row, seq in enumerate(seqs):
            alone = model(seq[None], labels=seq[None])
            torch.testing.assert_close(out.logits[row][mask[row].bool()], alone.logits[0], **TOL)
            total, count = total + alone.loss * (len(seq) - 1), count + len(seq) - 1
        torch.testing.assert_close(out.loss, total / count, **TOL)


def test_packed_documents_equal_separate_documents():
    model = tiny_f(seed=8, tie_attn_weights=False)
    docs = [random_ids(1, n, seed=9 + n)[0] for n in (4, 13, 7)]  # longer and shorter than the span 2w = 6
    ids, cu_seqlens = torch.cat(docs)[None], torch.tensor([0, 4, 17, 24])
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu_seqlens, labels=ids, use_cache=False)
        total, count = 0.0, 0
        for i, doc in enumerate(docs):
            alone = model(doc[None], labels=doc[None])
            torch.testing.assert_close(packed.logits[0, cu_seqlens[i]:cu_seqlens[i + 1]], alone.logits[0], **TOL)
            total, count = total + alone.loss * (len(doc) - 1), count + len(doc) - 1
        torch.testing.assert_close(packed.loss, total / count, **TOL)


def test_gradients_reach_every_parameter_and_checkpointing_keeps_them():
    model = tiny_f(seed=10, tie_attn_weights=False, qk_norm=True).train()
    ids = random_ids(2, 12, seed=11)  # longer than w: the fading path (and its own projections) is read
    model(ids, labels=ids).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], **TOL, msg=name)


def test_fresh_weights_reinitialise_linears_and_keep_the_mixer_decays_and_convolutions():
    torch.manual_seed(0)
    model = BMojoForCausalLM(BMojoConfig(variant="f", vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                         num_heads=4, head_dim=16, window_size=8, initializer_range=0.02))
    mixer = model.model.layers[0].attn.fading_mixer
    for linear in (mixer.q_proj, mixer.o_proj, model.model.layers[0].attn.k_proj):
        assert abs(linear.weight.std().item() - 0.02) < 0.002
    A = mixer.A_log.exp()
    dt = F.softplus(mixer.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-9)).all()
    bound = mixer.conv_size**-0.5  # Conv1d's own init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = W
    assert mixer.q_conv1d.weight.abs().max() <= bound and mixer.q_conv1d.weight.std() > 0.1


def test_a_training_step_does_not_synchronise_the_host():
    """Both attention paths; the recall benchmark captures the training step in a CUDA graph."""
    for attn_impl, T in (("dense", 12), ("blocked", 150)):
        model = tiny_f(seed=12, attn_impl=attn_impl).train()
        ids = random_ids(2, T, seed=13)
        assert find_host_syncs(lambda: model(input_ids=ids, labels=ids).loss.backward()) == [], attn_impl


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("prefill", [0, 7])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_reproduces_the_full_forward(name, prefill):
    """17 tokens pass the rings (w = 3: 3 and 6 slots) several times."""
    model = tiny_f(seed=14, **VARIANTS[name])
    ids = random_ids(2, 17, seed=15)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        logits, cache = [], None
        if prefill:
            out = model(ids[:, :prefill], use_cache=True)
            logits, cache = [out.logits], out.cache
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache
    assert isinstance(cache, LayerStateCache) and cache.get_seq_length() == 17
    assert all(isinstance(state, BMojoFState) for state in cache.layer_states)
    torch.testing.assert_close(torch.cat(logits, 1), full, **TOL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generate_with_left_padding_equals_the_no_cache_argmax_continuation(name):
    model = tiny_f(seed=16, **VARIANTS[name])
    seqs = [random_ids(1, 9, seed=17)[0], random_ids(1, 4, seed=18)[0], random_ids(1, 1, seed=19)[0]]
    ids, mask = left_padded(seqs)
    new = 8  # past the span 2w = 6: the later tokens read fading tokens of generated ones
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True,
                               pad_token_id=0)
    assert generated.shape == (3, 9 + new)
    with torch.no_grad():
        for row, seq in enumerate(seqs):
            for _ in range(new):  # the no-cache forward of the unpadded sequence, one argmax at a time
                seq = torch.cat([seq, model(seq[None], use_cache=False).logits[0, -1].argmax()[None]])
            assert torch.equal(generated[row, 9:], seq[-new:]), row


def test_beam_search_with_and_without_cache_agree():
    model = tiny_f(seed=20)
    prompt = random_ids(2, 5, seed=21)
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert cached.shape == (4, 10)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))


def test_state_size_is_constant_in_the_context_and_equals_the_formula():
    shape = dict(num_heads=4, num_kv_heads=2, head_dim=4, fading_num_heads=3, fading_head_dim=5, window_size=3,
                 conv_size=3, num_hidden_layers=2)
    model = tiny_f(seed=25, **shape)
    Hf, Kf, W, w, Hkv, Dh = 3, 5, 3, 3, 2, 4
    memory, conv, rings = Hf * Kf**2, 3 * (W - 1) * Hf * Kf, 6 * w * Hkv * Dh
    assert model.recurrent_state_size() == 2 * (memory + conv + rings)
    assert model.recurrent_state_size(include_conv=False) == 2 * (memory + rings)
    with torch.no_grad():
        sizes = {model(random_ids(1, T, seed=T), use_cache=True).cache.num_floats() for T in (1, 5, 40)}
    assert sizes == {model.recurrent_state_size()}


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_save_load_round_trip_and_auto_classes(tmp_path, tie_word_embeddings):
    model = tiny_f(seed=26, tie_word_embeddings=tie_word_embeddings, **VARIANTS["gla-no-rope-small-fading"],
                   num_heads=4, num_kv_heads=1, tie_attn_weights=False, qk_norm=True)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    saved = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    assert isinstance(config, BMojoConfig) and saved.items() <= config.to_dict().items()
    assert (config.variant, config.rope_theta, config.num_kv_heads, config.fading_head_dim) == ("f", None, 1, 6)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, output_loading_info=True)
    assert isinstance(loaded, BMojoForCausalLM) and not info["missing_keys"] and not info["unexpected_keys"]
    ids = random_ids(2, 11, seed=27)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, **TOL)
    assert isinstance(AutoModel.from_pretrained(tmp_path, dtype=torch.float64), BMojoModel)


def test_store_configs_stay_as_they_were():
    """A config saved before the variant existed is a "store" one and holds none of B'MOJO-F's fields."""
    config = AutoConfig.from_pretrained(os.path.join(FIXTURES, "bmojo"))
    assert config.variant == "store" and config.eidetic_size == 3
    fresh = BMojoConfig().to_dict()
    assert fresh["variant"] == "store" and not {"num_kv_heads", "rope_theta", "attn_impl"} & set(fresh)
    assert not {"chunk_size", "eidetic_size", "eviction"} & set(BMojoConfig(variant="f").to_dict())


# ---------------------------------------------------------------------------------------------- presets, config


def test_presets_and_recall_config():
    for name in ("bmojo-f-tiny", "bmojo-f-340m", "bmojo-f-1.3b"):
        config = BMojoConfig(vocab_size=100, **BMOJO_PRESETS[name])
        same_shape = BMOJO_PRESETS[name.replace("bmojo-f", "bmojo")]
        assert config.variant == "f" and config.window_size <= 512
        assert all(getattr(config, k) == same_shape[k] for k in ("hidden_size", "num_hidden_layers", "num_heads",
                                                                  "head_dim"))
    tiny = build_model("bmojo-f-tiny", vocab_size=50, overrides=dict(qk_norm=True), eos_token_id=3)
    assert isinstance(tiny.model.layers[0].attn, BMojoF) and tiny.model.layers[0].attn.q_norm is not None
    config = bmojo_f_recall_config(vocab_size=64, d_model=64, num_layers=2, head_dim=16)
    assert (config.variant, config.num_heads, config.head_dim, config.window_size) == ("f", 4, 16, 64)
    assert config.intermediate_size == 128 and config.pad_token_id is None
    with pytest.raises(ValueError, match="d_model must be a multiple of head_dim=16"):
        bmojo_f_recall_config(vocab_size=64, d_model=72, num_layers=2, head_dim=16)


@pytest.mark.parametrize("bad, match", [
    (dict(variant="F"), r"variant must be one of \['store', 'f'\], got 'F'"),
    (dict(variant="f", eviction="fifo"), r"eviction is a field of variant='store'; with variant='f' leave it"),
    (dict(variant="f", eidetic_size=0), "eidetic_size is a field of variant='store'"),
    (dict(num_kv_heads=2), r"num_kv_heads is a field of variant='f'; with variant='store' leave it at its default"),
    (dict(rope_theta=None), "rope_theta is a field of variant='f'"),
    (dict(variant="f", num_heads=4, num_kv_heads=3), "num_kv_heads must divide num_heads=4, got 3"),
    (dict(variant="f", head_dim=5), "head_dim must be even with rotary embeddings"),
    (dict(variant="f", fading_head_dim=0), "fading_head_dim must be an integer >= 1"),
    (dict(variant="f", fading_rule="mamba2"), "fading_rule must be one of"),
    (dict(variant="f", attn_impl="flash"), "attn_impl must be one of"),
    (dict(variant="f", tie_attn_weights=1), "tie_attn_weights must be True or False"),
    (dict(variant="f", window_size=0), "window_size must be an integer >= 1"),
])
def test_config_rejects_bad_values_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        BMojoConfig(**bad)
