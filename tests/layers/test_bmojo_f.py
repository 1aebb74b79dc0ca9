"""B'MOJO-F against bmojo_f_reference (full attention over [x-keys; f-keys] with two band masks), in float64:
both attention paths, padding, packed documents, GQA, untied weights, q/k norms, rope; decode == forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from memmix.layers import BMojoF, BMojoFState, bmojo_f_reference
from memmix.layers import bmojo_f as bmojo_f_module
from memmix.layers.attention import CausalSelfAttention

from helpers import check_bad_masks_raise, rel_err

D = 16
TOL = 1e-10


def make_layer(seed: int = 0, **overrides) -> BMojoF:
    """A float64 layer whose weights are large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    kwargs = dict(num_heads=2, head_dim=4, window_size=3, conv_size=3)
    kwargs.update(overrides)
    layer = BMojoF(D, **kwargs).double()
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if param.dim() >= 2 and "conv" not in name:
                param.mul_(4.0)
    return layer


def grads(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    """d(out . upstream) / (x, every parameter)."""
    params = [x] + [p for p in layer.parameters()]
    return torch.autograd.grad((out * upstream).sum(), params, allow_unused=True, materialize_grads=True)


def assert_matches_reference(layer, x, **inputs):
    x = x.clone().requires_grad_(True)
    out = layer(x, **inputs).hidden_states
    ref = bmojo_f_reference(layer, x, **inputs)
    assert rel_err(out, ref) < TOL
    upstream = torch.randn_like(ref)
    for got, want in zip(grads(layer, x, out, upstream), grads(layer, x, ref, upstream)):
        assert rel_err(got, want, floor=1e-12) < 1e-9


CONFIGS = {
    "default": {},
    "w1": dict(window_size=1),
    "w-longer-than-T": dict(window_size=50),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mqa-untied-qknorm": dict(num_heads=4, num_kv_heads=1, tie_attn_weights=False, qk_norm=True),
    "untied": dict(tie_attn_weights=False),
    "qknorm": dict(qk_norm=True),
    "no-rope": dict(rope_theta=None, head_dim=3),
    "delta": dict(fading_rule="delta", fading_num_heads=1, fading_head_dim=6),
    "gla": dict(fading_rule="gla"),
    "linear": dict(fading_rule="linear"),
}


@pytest.mark.parametrize("attn_impl", ["dense", "blocked"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_match_reference(name, attn_impl):
    layer = make_layer(**CONFIGS[name], attn_impl=attn_impl)
    assert_matches_reference(layer, torch.randn(2, 19, D, dtype=torch.float64))


@pytest.mark.parametrize("window", [2, 5, 70])
def test_blocked_path_over_several_blocks(window):
    """T = 150: three query blocks of max(w, 64) tokens; the fading band reaches across block borders."""
    layer = make_layer(window_size=window, num_heads=4, num_kv_heads=2, tie_attn_weights=False, attn_impl="blocked")
    assert_matches_reference(layer, torch.randn(1, 150, D, dtype=torch.float64))


@pytest.mark.parametrize("length", [1, 2])
def test_shortest_inputs(length):
    layer = make_layer(attn_impl="blocked")
    assert_matches_reference(layer, torch.randn(3, length, D, dtype=torch.float64))


@pytest.mark.parametrize("attn_impl", ["dense", "blocked"])
@pytest.mark.parametrize("side", ["left", "right", "holes"])
def test_padding_matches_reference(side, attn_impl):
    T = 17
    mask = torch.ones(3, T, dtype=torch.long)
    if side == "left":  # as generate() pads
        mask[0, :6] = 0
        mask[2, :12] = 0
    elif side == "right":
        mask[0, 9:] = 0
        mask[1, 4:] = 0
    else:
        mask[0, ::3] = 0
        mask[2, 5:9] = 0
    layer = make_layer(num_heads=4, num_kv_heads=2, qk_norm=True, attn_impl=attn_impl)
    x = torch.randn(3, T, D, dtype=torch.float64)
    assert_matches_reference(layer, x, attention_mask=mask)
    out = layer(x, attention_mask=mask).hidden_states
    assert out[mask == 0].abs().max() == 0


@pytest.mark.parametrize("attn_impl", ["dense", "blocked"])
def test_packed_documents_match_reference(attn_impl):
    """Documents of lengths 5, 0, 11, 1, 23: no attention across them, the mixer restarts at each."""
    cu_seqlens = torch.tensor([0, 5, 5, 16, 17, 40])
    layer = make_layer(tie_attn_weights=False, attn_impl=attn_impl)
    assert_matches_reference(layer, torch.randn(1, 40, D, dtype=torch.float64), cu_seqlens=cu_seqlens)


def test_packed_documents_equal_separate_runs():
    cu_seqlens = torch.tensor([0, 7, 20, 26])
    layer = make_layer()
    x = torch.randn(1, 26, D, dtype=torch.float64)
    packed = layer(x, cu_seqlens=cu_seqlens, use_cache=True)
    for n, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        alone = layer(x[:, a:b], use_cache=True)
        assert rel_err(packed.hidden_states[:, a:b], alone.hidden_states) < TOL
        for field in ("memory", "conv", "keys", "values", "fading_keys", "fading_values"):
            assert rel_err(getattr(packed.state, field)[n], getattr(alone.state, field)[0], floor=1e-12) < TOL


class _IdentityMixer(nn.Module):
    """Stands in for the fading mixer: f = x."""

    def forward(self, x, lengths, use_cache=False):
        return x, None, None


@pytest.mark.parametrize("attn_impl", ["dense", "blocked"])
def test_with_f_equal_x_it_is_sliding_window_attention_of_2w(attn_impl):
    """An oracle independent of bmojo_f_reference: when the fading tokens are the inputs themselves (tied
    weights), one softmax over the two bands is causal attention over the last 2w tokens, rope included."""
    w, H, Hkv, Dh = 4, 4, 2, 4
    layer = make_layer(window_size=w, num_heads=H, num_kv_heads=Hkv, head_dim=Dh, attn_impl=attn_impl)
    layer.fading_mixer = _IdentityMixer()
    swa = CausalSelfAttention(D, H, num_kv_heads=Hkv, head_dim=Dh, window_size=2 * w).double()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(swa, name).weight.data.copy_(getattr(layer, name).weight.data)
    x = torch.randn(2, 21, D, dtype=torch.float64)
    assert rel_err(layer(x).hidden_states, swa(x).hidden_states) < TOL


def test_fading_tokens_reach_only_queries_at_least_w_later():
    w, T = 5, 16
    layer = make_layer(window_size=w)
    x = torch.randn(2, T, D, dtype=torch.float64)
    before = layer(x).hidden_states
    with torch.no_grad():
        layer.fading_mixer.o_proj.weight.mul_(-2.0)
    after = layer(x).hidden_states
    assert rel_err(after[:, :w], before[:, :w]) == 0
    assert (after[:, w:] - before[:, w:]).abs().amax(-1).min() > 1e-6


@pytest.mark.parametrize("w, T, blocked", [(3, 200, True), (3, 60, False), (40, 100, False), (40, 300, True)])
def test_auto_uses_blocks_without_a_quadratic_mask(monkeypatch, w, T, blocked):
    """auto: one (T, 2T) mask only while a block's keys would be as many; above, one SDPA over all blocks whose
    keys and mask grow as T (block + w), not T^2."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((tuple(k.shape), attn_mask.numel()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(bmojo_f_module.F, "scaled_dot_product_attention", spy)
    layer = make_layer(window_size=w)
    x = torch.randn(1, T, D, dtype=torch.float64)
    out = layer(x).hidden_states
    assert len(seen) == 1  # one SDPA call, all blocks in it
    (rows, _, keys, _), mask_size = seen[0]
    block = max(w, bmojo_f_module.MIN_BLOCK)
    if blocked:
        assert keys <= 2 * (block + w - 1 + 7) and rows == -(-T // bmojo_f_module.block_size(w))
        assert mask_size <= (T + block + 7) * keys < T * 2 * T
    else:
        assert (rows, keys) == (1, 2 * T) and 2 * T <= 2 * (block + w - 1 + 7)
    assert rel_err(out, bmojo_f_reference(layer, x)) < TOL


# ---------------------------------------------------------------------------------------------- decoding

DECODE_CONFIGS = {
    "default": {},
    "w1": dict(window_size=1),
    "gqa-untied-qknorm": dict(num_heads=4, num_kv_heads=2, tie_attn_weights=False, qk_norm=True),
    "gla-no-rope": dict(fading_rule="gla", rope_theta=None),
}


@pytest.mark.parametrize("prefill", [0, 1, 7])
@pytest.mark.parametrize("name", list(DECODE_CONFIGS))
def test_prefill_then_steps_equal_one_forward(name, prefill):
    """Left-padded batch (as generate() gives it): prefill, then one token per call with the growing mask.
    20 tokens pass the rings (w = 3: 3 and 6 slots) several times."""
    T = 20
    layer = make_layer(**DECODE_CONFIGS[name])
    x = torch.randn(3, T, D, dtype=torch.float64)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :prefill + 2] = 0  # nothing real in its prefill
    full = layer(x, attention_mask=mask).hidden_states
    if prefill:
        first = layer(x[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        outs, state = [first.hidden_states], first.state
    else:
        outs, state = [], layer.init_state(3, dtype=torch.float64)
    for t in range(prefill, T):
        step = layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], state=state, use_cache=True)
        outs.append(step.hidden_states)
        state = step.state
    assert rel_err(torch.cat(outs, 1), full) < TOL
    assert state.seen.tolist() == mask.sum(1).tolist()


def test_prefill_state_equals_stepped_state():
    layer = make_layer(num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, 8:] = 0  # right padding: the state is the one after the last real token
    prefilled = layer(x, attention_mask=mask, use_cache=True).state
    stepped = layer(x, attention_mask=mask, state=layer.init_state(2, dtype=torch.float64), use_cache=True).state
    for field in ("memory", "conv", "keys", "values", "fading_keys", "fading_values", "seen"):
        assert rel_err(getattr(prefilled, field), getattr(stepped, field), floor=1e-12) < TOL, field


def test_decode_gradients_match_forward():
    layer = make_layer(tie_attn_weights=False)
    x = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    first = layer(x[:, :4], use_cache=True)
    rest = layer(x[:, 4:], state=first.state, use_cache=True)
    stepped = torch.cat([first.hidden_states, rest.hidden_states], 1)
    full = layer(x).hidden_states
    upstream = torch.randn_like(full)
    for got, want in zip(grads(layer, x, stepped, upstream), grads(layer, x, full, upstream)):
        assert rel_err(got, want, floor=1e-12) < 1e-9


def test_select_and_reorder_follow_the_rows():
    layer = make_layer(num_heads=4, num_kv_heads=2)
    x = torch.randn(3, 10, D, dtype=torch.float64)
    state = layer(x[:, :6], use_cache=True).state
    index = torch.tensor([2, 0, 0])
    picked = state.select(index)
    beams = state.reorder(index)
    for field in ("memory", "conv", "keys", "values", "fading_keys", "fading_values", "seen"):
        assert torch.equal(getattr(picked, field), getattr(state, field)[index])
        assert torch.equal(getattr(beams, field), getattr(state, field)[index])
    whole = layer(x[:, 6:], state=state).hidden_states
    rows = layer(x[index, 6:], state=picked).hidden_states
    assert rel_err(rows, whole[index]) < TOL


def test_state_size_is_constant_and_counts_every_float():
    layer = make_layer(num_heads=4, num_kv_heads=2, fading_num_heads=3, fading_head_dim=5, window_size=4)
    sizes = set()
    for T in (1, 5, 30):
        state = layer(torch.randn(2, T, D, dtype=torch.float64), use_cache=True).state
        floats = sum(getattr(state, f).numel() for f in ("memory", "conv", "keys", "values", "fading_keys",
                                                          "fading_values"))
        sizes.add(floats // 2)
    assert sizes == {layer.state_size()}
    assert layer.state_size() == 3 * 5 * 5 + 2 * 3 * 15 + 6 * 4 * 2 * 4


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(window_size=0), "window_size"),
    (dict(window_size=2.0), "window_size"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(fading_rule="mamba2"), "fading_rule"),
    (dict(tie_attn_weights=1), "tie_attn_weights"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(head_dim=5), "head_dim"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(conv_size=1), "conv_size"),
    (dict(impl="cuda"), "impl"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(fading_head_dim=0), "fading_head_dim"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BMojoF(D, **kwargs)


def test_bad_inputs_raise_clear_errors():
    layer = make_layer()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    check_bad_masks_raise(layer, x)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x[:1], cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x[:1], cu_seqlens=torch.tensor([0, 2, 5]), state=layer.init_state(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="state holds 3 sequences"):
        layer(x, state=layer.init_state(3, dtype=torch.float64))
    assert isinstance(layer(x, use_cache=True).state, BMojoFState)
