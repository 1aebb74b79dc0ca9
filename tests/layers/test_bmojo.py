"""BMojo against a per-token, per-head loop written from the layer's description, and its own decode path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memmix.layers import BMojo, BMojoState
from memmix.ops import l2norm

from helpers import check_bad_masks_raise, rel_err


def make_layer(seed: int = 0, **overrides) -> BMojo:
    """A float64 layer whose weights are large enough that every memory matters."""
    torch.manual_seed(seed)
    kwargs = dict(num_heads=2, head_dim=6, window_size=5, chunk_size=4, eidetic_size=3, eidetic_per_chunk=2,
                  conv_size=3)
    kwargs.update(overrides)
    layer = BMojo(24, **kwargs).double()
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if param.dim() >= 2 and "conv" not in name:
                param.mul_(4.0)
    return layer


def naive_bmojo(layer: BMojo, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over rows, tokens and heads with Python lists for the window, store and candidates: (B, T, D)."""
    B, T, D = x.shape
    H, Dh, W = layer.num_heads, layer.head_dim, layer.conv_size
    w, C, E, a = layer.window_size, layer.chunk_size, layer.eidetic_size, layer.eidetic_per_chunk
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    conv_w = layer.conv1d.weight[:, 0]  # (3 H Dh, W)
    out = torch.zeros(B, T, D, dtype=x.dtype)
    for b in range(B):
        S = torch.zeros(H, Dh, Dh, dtype=x.dtype)
        history, window = [], []  # window: (position, k (H, Dh), v (H, Dh))
        store = [[] for _ in range(H)]  # per head: (score, position, k, v)
        pending = [[] for _ in range(H)]
        for p, t in enumerate([t for t in range(T) if mask[b, t]]):
            xt = x[b, t]
            history.append(torch.cat([layer.q_proj.weight @ xt, layer.k_proj.weight @ xt, layer.v_proj.weight @ xt]))
            frame = torch.stack(([torch.zeros_like(history[0])] * W + history)[-W:])  # (W, C)
            q, k, v = F.silu((frame.t() * conv_w).sum(-1)).view(3, H, Dh)
            decay = torch.ones(H, dtype=x.dtype)
            if layer.a_proj is not None:
                decay = torch.exp(-layer.A_log.exp() * F.softplus(layer.a_proj.weight @ xt + layer.dt_bias))
            beta = torch.sigmoid(layer.b_proj.weight @ xt) if layer.b_proj is not None else None
            o_fading, scores = torch.zeros(H, Dh, dtype=x.dtype), []
            for h in range(H):
                kh, qh = l2norm(k[h]), l2norm(q[h]) * Dh**-0.5
                prediction = decay[h] * (S[h].t() @ kh)
                scores.append(((v[h] - prediction).pow(2).sum() / (v[h].pow(2).sum() + 1e-6)).item())
                S[h] = decay[h] * S[h]
                u = v[h] if beta is None else beta[h] * (v[h] - S[h].t() @ kh)
                S[h] = S[h] + torch.outer(kh, u)
                o_fading[h] = S[h].t() @ qh
            normed = o_fading * torch.rsqrt(o_fading.pow(2).mean(-1, keepdim=True) + layer.fading_norm.eps)
            flat = (normed * layer.fading_norm.weight).reshape(-1)
            fk, fv = (layer.fading_k_proj.weight @ flat).view(H, Dh), (layer.fading_v_proj.weight @ flat).view(H, Dh)
            window = [item for item in window if p - item[0] < w] + [(p, k, v)]
            heads = []
            for h in range(H):
                keys = [e[2] for e in store[h] if p - e[1] >= w] + [item[1][h] for item in window] + [fk[h]]
                vals = [e[3] for e in store[h] if p - e[1] >= w] + [item[2][h] for item in window] + [fv[h]]
                probs = torch.softmax(torch.stack(keys) @ q[h] * Dh**-0.5, dim=0)
                heads.append(probs @ torch.stack(vals))
                pending[h] = sorted(pending[h] + [(scores[h], p, k[h], v[h])], key=lambda e: -e[0])[:a]
                if (p + 1) % C == 0:
                    rank = (lambda e: -e[1]) if layer.eviction == "fifo" else (lambda e: -e[0])
                    store[h] = sorted(store[h] + pending[h], key=rank)[:E]
                    pending[h] = []
            out[b, t] = layer.o_proj.weight @ torch.cat(heads)
    return out


def run_steps(layer: BMojo, x: torch.Tensor, mask: torch.Tensor | None = None):
    """The decode path from an empty state over every token: (B, T, D) output and the final state."""
    B, T, _ = x.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    state = layer.init_state(B, dtype=x.dtype)
    outputs = []
    for t in range(T):
        out, state = layer.step(x[:, t], mask[:, t], state)
        outputs.append(out)
    return torch.stack(outputs, 1), state


CONFIGS = [
    dict(),
    dict(fading_rule="delta"),
    dict(fading_rule="gla"),
    dict(fading_rule="linear"),
    dict(eviction="fifo"),
    dict(window_size=1, chunk_size=3, eidetic_per_chunk=3),  # window = the token itself; admit whole chunks
    dict(window_size=9, chunk_size=2, eidetic_size=5, eidetic_per_chunk=1),  # window spans several chunks
    dict(eidetic_size=0, eidetic_per_chunk=0),  # B'MOJO-F: fading memory and window only
]


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("length", [1, 13])
def test_chunked_forward_matches_naive_loop(overrides, length):
    layer = make_layer(**overrides)
    x = torch.randn(2, length, 24, dtype=torch.float64)
    assert rel_err(layer(x).hidden_states, naive_bmojo(layer, x)) < 1e-10


@pytest.mark.parametrize("overrides", CONFIGS[:5])
def test_decode_steps_reproduce_chunked_forward_and_state(overrides):
    layer = make_layer(seed=1, **overrides)
    x = torch.randn(3, 19, 24, dtype=torch.float64)
    full = layer(x, use_cache=True)
    stepped, state = run_steps(layer, x)
    assert rel_err(stepped, full.hidden_states) < 1e-10
    assert torch.allclose(state.memory, full.state.memory, atol=1e-12)
    assert torch.equal(state.seen, full.state.seen)
    assert torch.equal(state.store_positions.sort(-1).values, full.state.store_positions.sort(-1).values)
    assert torch.equal(state.pending_positions.sort(-1).values, full.state.pending_positions.sort(-1).values)
    assert torch.allclose(state.window_keys, full.state.window_keys, atol=1e-12)
    assert torch.allclose(state.conv, full.state.conv, atol=1e-12)


@pytest.mark.parametrize("split", [1, 4, 9])
def test_prefill_then_continue_equals_one_pass(split):
    layer = make_layer(seed=2)
    x = torch.randn(2, 15, 24, dtype=torch.float64)
    full = layer(x).hidden_states
    first = layer(x[:, :split], use_cache=True)
    rest = layer(x[:, split:], state=first.state, use_cache=True)
    assert rel_err(torch.cat([first.hidden_states, rest.hidden_states], 1), full) < 1e-10
    assert int(rest.state.seen[0]) == 15


@pytest.mark.parametrize("side", ["left", "right", "middle"])
def test_padded_batch_equals_each_sequence_alone(side):
    layer = make_layer(seed=3)
    lengths, T = [13, 6], 13
    x = torch.randn(2, T, 24, dtype=torch.float64)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        start = {"left": T - n, "right": 0, "middle": (T - n) // 2}[side]
        mask[b, start:start + n] = 1
    out = layer(x, attention_mask=mask, use_cache=True)
    assert torch.equal(out.state.seen, torch.tensor(lengths))
    for b in range(2):
        real = mask[b].bool()
        alone = layer(x[b:b + 1, real], use_cache=True)
        assert rel_err(out.hidden_states[b, real], alone.hidden_states[0]) < 1e-10
        assert torch.all(out.hidden_states[b, ~real] == 0)
        assert torch.allclose(out.state.memory[b], alone.state.memory[0], atol=1e-12)
    stepped, state = run_steps(layer, x, mask)
    assert rel_err(stepped[mask.bool()], out.hidden_states[mask.bool()]) < 1e-10
    assert torch.equal(state.store_positions.sort(-1).values, out.state.store_positions.sort(-1).values)


def test_packed_documents_equal_separate_runs():
    layer = make_layer(seed=4)
    lengths = [5, 11, 1]
    x = torch.randn(1, sum(lengths), 24, dtype=torch.float64)
    cu = torch.tensor([0, 5, 16, 17])
    packed = layer(x, cu_seqlens=cu, use_cache=True)
    assert packed.state.memory.shape[0] == 3
    for i in range(3):
        doc = x[:, cu[i]:cu[i + 1]]
        alone = layer(doc, use_cache=True)
        assert rel_err(packed.hidden_states[:, cu[i]:cu[i + 1]], alone.hidden_states) < 1e-10
        assert torch.allclose(packed.state.memory[i], alone.state.memory[0], atol=1e-12)


@pytest.mark.parametrize("eviction", ["score", "fifo"])
def test_store_respects_its_bound_and_admissions(eviction):
    layer = make_layer(seed=5, eidetic_size=5, eidetic_per_chunk=2, chunk_size=3, eviction=eviction)
    state = layer.init_state(2, dtype=torch.float64)
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    for t in range(40):
        _, state = layer.step(x[:, t], torch.ones(2, dtype=torch.bool), state)
        chunks_done = (t + 1) // 3
        assert torch.all(state.store_size == min(5, 2 * chunks_done))  # random scores: never fewer
        assert state.store_keys.shape[2] == 5 and state.pending_keys.shape[2] == 2  # fixed-size state
        stored = state.store_positions[torch.isfinite(state.store_scores)]
        assert torch.all(stored < chunks_done * 3)  # only finished chunks are admitted
        per_chunk = torch.stack([(state.store_positions // 3 == c) & torch.isfinite(state.store_scores)
                                 for c in range(chunks_done + 1)]).sum(-1)
        assert per_chunk.max() <= 2
    if eviction == "fifo":  # the store holds the admissions of the last chunks
        assert torch.all(state.store_positions.min(-1).values >= (40 // 3 - 3) * 3)
    else:  # kept entries beat every evicted candidate
        assert torch.all(state.store_scores.min(-1).values > 0)


def test_state_size_does_not_grow_with_length():
    layer = make_layer(seed=6)
    sizes = []
    for T in (8, 40):
        state = layer(torch.randn(1, T, 24, dtype=torch.float64), use_cache=True).state
        sizes.append([getattr(state, name).shape for name in state.__dataclass_fields__])
    assert sizes[0] == sizes[1]


def test_store_is_read_beyond_the_window():
    layer = make_layer(seed=7, window_size=2, chunk_size=2, eidetic_size=4, eidetic_per_chunk=1)
    x = torch.randn(1, 12, 24, dtype=torch.float64)
    with_store = layer(x).hidden_states
    layer.eidetic_size, layer.eidetic_per_chunk = 0, 0
    without = layer(x).hidden_states
    assert torch.allclose(with_store[:, :3], without[:, :3])  # nothing is old enough yet
    assert rel_err(with_store[:, 4:], without[:, 4:]) > 1e-3


@pytest.mark.parametrize("overrides", [dict(), dict(fading_rule="gla")])
def test_gradients_of_chunked_path_equal_the_step_loop(overrides):
    layer = make_layer(seed=8, **overrides)
    x = torch.randn(2, 11, 24, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 11, 24, dtype=torch.float64)
    (layer(x).hidden_states * weights).sum().backward()
    chunked = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grad_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    (run_steps(layer, x)[0] * weights).sum().backward()
    for name, param in layer.named_parameters():
        assert chunked[name].abs().sum() > 0, name
        assert rel_err(chunked[name], param.grad) < 1e-9, name
    assert rel_err(grad_x, x.grad) < 1e-9


def test_float32_forward_close_to_float64():
    layer = make_layer(seed=9)
    x = torch.randn(2, 21, 24, dtype=torch.float64)
    reference = layer(x).hidden_states
    out32 = layer.float()(x.float()).hidden_states
    assert out32.dtype == torch.float32
    assert rel_err(out32.double(), reference) < 1e-4


def test_state_select_reorders_rows():
    layer = make_layer(seed=10)
    state = layer(torch.randn(3, 9, 24, dtype=torch.float64), use_cache=True).state
    picked = state.select(torch.tensor([2, 0]))
    assert isinstance(picked, BMojoState)
    assert torch.equal(picked.memory[0], state.memory[2]) and torch.equal(picked.store_keys[1], state.store_keys[0])


@pytest.mark.parametrize("bad", [dict(fading_rule="mamba"), dict(eviction="lru"), dict(window_size=0),
                                 dict(eidetic_per_chunk=9, chunk_size=4), dict(eidetic_size=-1),
                                 dict(eidetic_size=4, eidetic_per_chunk=0), dict(conv_size=1)])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        BMojo(16, **bad)


def test_bad_inputs_raise():
    layer = make_layer()
    x = torch.randn(2, 4, 24, dtype=torch.float64)
    check_bad_masks_raise(layer, x)
    state = layer(x, use_cache=True).state
    with pytest.raises(ValueError, match="state holds"):
        layer(x[:1], state=state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", ["gated_delta", "gla"])
def test_cuda_forward_and_gradients_match_float64_cpu(rule):
    layer = make_layer(seed=11, fading_rule=rule, num_heads=2, head_dim=64, window_size=40, chunk_size=32,
                       eidetic_size=16, eidetic_per_chunk=4)
    x = torch.randn(2, 150, 24, dtype=torch.float64)
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, :37] = 0
    reference = layer(x, attention_mask=mask).hidden_states
    reference.pow(2).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    cuda_layer = layer.float().cuda()
    out = cuda_layer(x.float().cuda(), attention_mask=mask.cuda()).hidden_states
    out.pow(2).sum().backward()
    assert rel_err(out.double().cpu(), reference) < 2e-3
    for name, param in cuda_layer.named_parameters():
        assert rel_err(param.grad.double().cpu(), ref_grads[name]) < 1e-2, name
