"""MixtureOfMemories against the paper: its router by hand, the mixer's per-token loop (memmix.ops.mom.naive_mom),
its output gate, norm and projection; state, decoding, padding, modality groups, argument checks. The mixer op's
own paths are tested in tests/ops/mom."""
from __future__ import annotations

import pytest
import torch

from memmix.layers import MixtureOfMemories
from memmix.layers import mom as mom_module
from memmix.ops.mom import MoMWeights, naive_mom

from helpers import rel_err


def paper_forward(layer: MixtureOfMemories, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax router, top-k renormalised, the naive mixer loop over the layer's weights, output gate / norm /
    projection: x (B, T, D) -> (B, T, D). Pads (mask 0) touch nothing."""
    B, T, _ = x.shape
    H, V = layer.num_heads, layer.head_v_dim
    scores = layer.gate(x).float().softmax(-1)
    top_w, top_i = scores.topk(layer.topk, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    per_memory = [w for w in (layer.k_proj, layer.v_proj, layer.b_proj, layer.a_proj) if w is not None]
    convs = torch.cat([layer.q_conv1d.weight, layer.k_conv1d.weight, layer.v_conv1d.weight])[:, 0]
    weights = MoMWeights(layer.q_proj.weight, torch.cat(per_memory, dim=1), convs, layer.A_log, layer.dt_bias)
    out, _, _ = naive_mom(x, top_i, top_w, weights, rule=layer.memory_rule, num_heads=H,
                          num_memories=layer.num_memories, shared_memory=layer.shared_mem,
                          valid=None if mask is None else mask.bool())
    out = out.view(B, T, H, V)
    if layer.use_output_gate:
        out = layer.o_norm(out, layer.g_proj(x).view(B, T, H, V))
    else:
        out = layer.o_norm(out)
    return layer.o_proj(out.reshape(B, T, -1))


def make_layer(**kw) -> MixtureOfMemories:
    args = dict(hidden_size=16, num_heads=2, head_dim=4, num_memories=4, topk=2, shared_mem=True, impl="chunk")
    args.update(kw)
    torch.manual_seed(0)
    layer = MixtureOfMemories(**args).double()
    with torch.no_grad():  # a sharper router than the tiny init, so memories really differ
        layer.gate.weight.mul_(20)
    return layer


CASES = [
    dict(),
    dict(topk=1),
    dict(topk=4),
    dict(shared_mem=False),
    dict(single_kv_proj=True),
    dict(memory_rule="delta"),
    dict(memory_rule="gla", use_output_gate=False),
    dict(memory_rule="linear", expand_v=2.0),
    dict(num_memories=1, topk=1, shared_mem=False),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("T", [1, 7, 33])
def test_layer_matches_the_paper(kw, T):
    layer = make_layer(**kw)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    got = layer(x).hidden_states
    assert rel_err(got, paper_forward(layer, x)) < 1e-10


def test_padding_touches_nothing():
    layer = make_layer()
    x = torch.randn(3, 20, 16, dtype=torch.float64)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 13:] = 0  # right padding
    mask[2, [3, 9]] = 0  # holes
    got = layer(x, attention_mask=mask).hidden_states
    want = paper_forward(layer, x, mask)
    real = mask.bool()
    assert rel_err(got[real], want[real]) < 1e-10
    assert got[~real].abs().max() == 0
    # a padded token's content does not change any real token's output
    x2 = x.clone()
    x2[~real] = torch.randn_like(x2[~real]) * 100
    assert rel_err(layer(x2, attention_mask=mask).hidden_states[real], got[real]) < 1e-12


def test_packed_documents_equal_separate_runs():
    layer = make_layer()
    lengths = [5, 1, 0, 23, 9]
    docs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    packed = layer(torch.cat(docs, 1), cu_seqlens=cu, use_cache=True)
    pieces = packed.hidden_states.split(lengths, dim=1)
    for i, (doc, piece) in enumerate(zip(docs, pieces)):
        if lengths[i] == 0:
            continue
        alone = layer(doc, use_cache=True)
        assert rel_err(piece, alone.hidden_states) < 1e-10
        assert rel_err(packed.state.memory[i], alone.state.memory[0]) < 1e-10
        assert rel_err(packed.state.conv[i], alone.state.conv[0]) < 1e-10


@pytest.mark.parametrize("kw", [dict(), dict(memory_rule="gla"), dict(shared_mem=False, topk=1)])
def test_state_continuation_and_decoding(kw):
    layer = make_layer(**kw)
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    full = layer(x, use_cache=True)
    first = layer(x[:, :30], use_cache=True)
    state = first.state
    outs = [first.hidden_states]
    for t in range(30, 40):  # one token at a time (the dense layout)
        step = layer(x[:, t : t + 1], state=state, use_cache=True)
        outs.append(step.hidden_states)
        state = step.state
    assert rel_err(torch.cat(outs, 1), full.hidden_states) < 1e-10
    assert rel_err(state.memory, full.state.memory) < 1e-10
    assert rel_err(state.conv, full.state.conv) < 1e-10
    assert state.memory_states.shape == (2, layer.num_memories, 2, 4, 4)


def test_gradients_reach_every_parameter_and_match_the_paper():
    layer = make_layer()
    x = torch.randn(2, 21, 16, dtype=torch.float64, requires_grad=True)
    layer(x).hidden_states.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    gx = x.grad.clone()
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    paper_forward(layer, x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
        assert rel_err(grads[name], p.grad) < 1e-9, name
    assert rel_err(gx, x.grad) < 1e-9


def test_router_logits_and_state_shapes():
    layer = make_layer()
    out = layer(torch.randn(3, 5, 16, dtype=torch.float64), use_cache=True)
    assert out.router_logits.shape == (3, 5, 4) and out.router_logits.dtype == torch.float32
    assert out.state.memory.shape == (3, 5, 2, 4, 4)
    assert out.state.shared_state.shape == (3, 2, 4, 4)
    assert out.state.conv.shape == (3, 5, 3, 2 * 8 + 8)
    assert layer(torch.randn(3, 5, 16, dtype=torch.float64)).state is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(topk=5), "topk"),
        (dict(topk=0), "topk"),
        (dict(memory_rule="mamba"), "memory_rule"),
        (dict(num_memories=0), "num_memories"),
        (dict(conv_size=1), "conv_size"),
        (dict(expand_v=0.3), "expand_v"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make_layer(**kw)


def test_bad_inputs():
    layer = make_layer()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="state"):
        layer(x, state=layer.init_state(3, dtype=torch.float64))


def test_decode_step_with_padding_leaves_that_state_alone():
    layer = make_layer()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    state = layer(x, use_cache=True).state
    step = torch.randn(2, 1, 16, dtype=torch.float64)
    mask = torch.tensor([[1] * 6 + [0], [1] * 7])
    out = layer(step, attention_mask=mask, state=state, use_cache=True)
    assert torch.equal(out.state.memory[0], state.memory[0]) and torch.equal(out.state.conv[0], state.conv[0])
    assert out.hidden_states[0].abs().max() == 0
    alone = layer(step[1:], state=state.select(torch.tensor([1])), use_cache=True)
    assert rel_err(out.hidden_states[1:], alone.hidden_states) < 1e-12
    assert rel_err(out.state.memory[1:], alone.state.memory) < 1e-12
    # exactly the top-k routed memories and the shared one changed for the real row
    changed = (out.state.memory[1] != state.memory[1]).flatten(1).any(-1)
    picked = layer.gate(step[1, 0]).topk(layer.topk).indices.tolist() + [layer.num_memories]
    assert sorted(torch.nonzero(changed).flatten().tolist()) == sorted(picked)


@pytest.mark.parametrize("memory_rule", mom_module.MEMORY_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_step_without_grad_equals_the_differentiable_step(memory_rule, dtype):
    """Without a gradient to track the picked states step in a copy of the bank (ops.memory_step); with one, by
    the differentiable gather / step / scatter. Same numbers, and neither writes the state it was given."""
    layer = make_layer(memory_rule=memory_rule).to(dtype).requires_grad_(False)
    state = layer.init_state(3, dtype=dtype)
    state.memory.normal_()
    state.conv.normal_()
    original = (state.memory.clone(), state.conv.clone())
    step = torch.randn(3, 1, 16, dtype=dtype)
    mask = torch.tensor([[1], [0], [1]])
    with torch.no_grad():
        fast = layer(step, attention_mask=mask, state=state, use_cache=True)
    tracked = mom_module.MoMState(state.memory.clone().requires_grad_(True), state.conv, state.num_routed)
    slow = layer(step, attention_mask=mask, state=tracked, use_cache=True)
    assert slow.state.memory.requires_grad and not fast.state.memory.requires_grad  # both paths ran
    assert torch.equal(fast.hidden_states, slow.hidden_states)
    assert torch.equal(fast.state.memory, slow.state.memory.detach()) and torch.equal(fast.state.conv, slow.state.conv)
    assert torch.equal(state.memory, original[0]) and torch.equal(state.conv, original[1])
    assert torch.equal(fast.state.memory[1], state.memory[1]) and not torch.equal(fast.state.memory, state.memory)


def test_memory_groups_keep_each_modality_in_its_own_memories():
    layer = make_layer(num_memories=6, topk=2, memory_groups=[4, 2])
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    modality = (torch.rand(2, 30) > 0.6).long()
    out = layer(x, modality_ids=modality, use_cache=True)
    picks = layer.gate(x).masked_fill(
        (torch.tensor([0, 0, 0, 0, 1, 1]) != modality.unsqueeze(-1)), float("-inf")).topk(2).indices
    assert ((picks >= 4) == modality.bool().unsqueeze(-1)).all()
    # a text-only run never touches the image memories (indices 4, 5)
    text_only = layer(x, modality_ids=torch.zeros_like(modality), use_cache=True)
    assert text_only.state.memory[:, 4:6].abs().max() == 0
    assert out.state.memory[:, 4:6].abs().max() > 0
    # image tokens do not change what text tokens see in text memories... only the shared memory mixes modalities
    layer_ns = make_layer(num_memories=6, topk=2, memory_groups=[4, 2], shared_mem=False)
    base = layer_ns(x, modality_ids=modality).hidden_states
    x2 = x.clone()
    x2[modality.bool()] += torch.randn_like(x2[modality.bool()])
    moved = layer_ns(x2, modality_ids=modality).hidden_states
    text = ~modality.bool()
    assert rel_err(moved[text], base[text]) < 1e-12


@pytest.mark.parametrize("groups, match", [([4, 1], "memory_groups"), ([3, 1], "smallest")])
def test_bad_memory_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        make_layer(num_memories=sum(groups) if match == "smallest" else 4, topk=2, memory_groups=groups)


def test_forward_is_one_mixer_call_with_the_layers_settings(monkeypatch):
    """The layer hands its runtime settings (impl, low_memory, in-place decoding) and the state to mom_mixer, and
    returns the state it was given when the op wrote it in place."""
    layer = make_layer(low_memory=True)
    layer.impl, layer.inplace_decode = "recurrent", True
    calls = []
    real = mom_module.mom_mixer

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mom_module, "mom_mixer", spy)
    state = layer.init_state(2, dtype=torch.float64)
    out = layer(torch.randn(2, 1, 16, dtype=torch.float64), state=state, use_cache=True)
    assert len(calls) == 1
    assert {k: calls[0][k] for k in ("impl", "low_memory", "inplace", "use_cache")} == dict(
        impl="recurrent", low_memory=True, inplace=True, use_cache=True)
    assert calls[0]["memory"] is state.memory and calls[0]["conv"] is state.conv
    assert out.state is state and state.memory.abs().sum() > 0  # written in place
