"""CausalSelfAttention against a per-query loop reference: RoPE, GQA, window, cache, padding, packing."""
from __future__ import annotations

import math

import pytest
import torch

from memmix.layers.attention import CausalSelfAttention

TOL = dict(rtol=1e-10, atol=1e-12)
D = 24


def make_layer(seed: int = 0, num_heads: int = 4, num_kv_heads: int = 2, window_size=None) -> CausalSelfAttention:
    torch.manual_seed(seed)
    layer = CausalSelfAttention(D, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=6,
                                rope_theta=500.0, window_size=window_size).double()
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.3)
    return layer


def rope_reference(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + K/2]) of one (K,) vector by position * theta^(-2i/K)."""
    half = x.shape[-1] // 2
    out = x.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / x.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def attention_reference(layer: CausalSelfAttention, x: torch.Tensor, window=None) -> torch.Tensor:
    """One unpadded sequence x (T, D) -> (T, D) with explicit loops over heads and queries."""
    T = x.shape[0]
    H, Hkv, K = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = (x @ layer.q_proj.weight.T).view(T, H, K)
    k = (x @ layer.k_proj.weight.T).view(T, Hkv, K)
    v = (x @ layer.v_proj.weight.T).view(T, Hkv, K)
    out = torch.zeros(T, H, K, dtype=x.dtype)
    for h in range(H):
        kv_head = h // (H // Hkv)
        for i in range(T):
            qi = rope_reference(q[i, h], i, layer.rope_theta)
            keys = [j for j in range(i + 1) if window is None or i - j < window]
            scores = torch.stack([qi @ rope_reference(k[j, kv_head], j, layer.rope_theta) for j in keys]) / math.sqrt(K)
            weights = scores.softmax(0)
            out[i, h] = sum(w * v[j, kv_head] for w, j in zip(weights, keys))
    return out.reshape(T, H * K) @ layer.o_proj.weight.T


@pytest.mark.parametrize("num_kv_heads, window", [(4, None), (2, None), (1, 3)], ids=["mha", "gqa", "mqa-window"])
def test_forward_matches_loop_reference_values_and_gradients(num_kv_heads, window):
    layer = make_layer(seed=1, num_kv_heads=num_kv_heads, window_size=window)
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    out = layer(x).hidden_states
    expected = torch.stack([attention_reference(layer, x[b], window) for b in range(2)])
    torch.testing.assert_close(out, expected, **TOL)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("window", [None, 3])
def test_cached_steps_reproduce_full_forward(window):
    layer = make_layer(seed=2, window_size=window)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    full = layer(x).hidden_states
    out = layer(x[:, :4], use_cache=True)
    state, steps = out.state, [out.hidden_states]
    for t in range(4, 11):
        out = layer(x[:, t : t + 1], state=state, use_cache=True)
        state = out.state
        steps.append(out.hidden_states)
        if window is not None:
            assert state.seq_len <= window  # the cache keeps only what later queries can see
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert state.next_position.tolist() == [11, 11]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_and_continues(side):
    layer = make_layer(seed=3, window_size=4)
    lengths = [3, 8, 6]
    seqs = [torch.randn(n, D, dtype=torch.float64) for n in lengths]
    x = torch.randn(3, 8, D, dtype=torch.float64)  # pads hold random values: only the mask may hide them
    mask = torch.zeros(3, 8, dtype=torch.long)
    for b, seq in enumerate(seqs):
        cols = slice(8 - len(seq), 8) if side == "left" else slice(0, len(seq))
        x[b, cols], mask[b, cols] = seq, 1
    out = layer(x, attention_mask=mask, use_cache=True)
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(out.hidden_states[b][mask[b].bool()], layer(seq[None]).hidden_states[0], **TOL)
    if side == "left":  # decoding after a left-padded prefill continues each sequence
        nxt = torch.randn(3, 1, D, dtype=torch.float64)
        step = layer(nxt, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                     state=out.state, use_cache=True).hidden_states
        for b, seq in enumerate(seqs):
            alone = layer(torch.cat([seq, nxt[b]])[None]).hidden_states[0, -1]
            torch.testing.assert_close(step[b, 0], alone, **TOL)


def test_packed_documents_equal_separate_forwards():
    layer = make_layer(seed=4, window_size=5)
    lengths = [4, 1, 7, 3]
    docs = [torch.randn(n, D, dtype=torch.float64) for n in lengths]
    cu_seqlens = torch.tensor([0, 4, 5, 12, 15])
    out = layer(torch.cat(docs)[None], cu_seqlens=cu_seqlens).hidden_states[0]
    for doc, start, end in zip(docs, cu_seqlens[:-1], cu_seqlens[1:]):
        torch.testing.assert_close(out[start:end], layer(doc[None]).hidden_states[0], **TOL)


def test_rope_is_relative_position_ids_shift_changes_nothing():
    layer = make_layer(seed=5)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    shifted = layer(x, position_ids=torch.arange(6)[None] + 37).hidden_states
    torch.testing.assert_close(shifted, layer(x).hidden_states, **TOL)
    assert not torch.allclose(layer(x, position_ids=torch.arange(6).flip(0)[None]).hidden_states, shifted)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="num_heads must be a positive multiple of num_kv_heads"):
        CausalSelfAttention(D, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be an even integer"):
        CausalSelfAttention(D, num_heads=2, head_dim=5)
    with pytest.raises(ValueError, match="window_size must be None or >= 1"):
        CausalSelfAttention(D, num_heads=2, window_size=0)
    layer = make_layer()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="cu_seqlens needs batch size 1"):
        layer(x, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D \(B, T_total >= T\)"):
        layer(x, attention_mask=torch.ones(2, 4))
