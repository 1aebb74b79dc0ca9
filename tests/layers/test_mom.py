"""MixtureOfMemories against the paper: its router by hand, the mixer's per-token loop (memmix.ops.mom.naive_mom),
its output gate, norm and projection; state, decoding, padding, modality groups, argument checks; the ablation
options (router temperature, routing from a short convolution, the sequence-wide convolution). The mixer op's own
paths are tested in tests/ops/mom."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memmix.layers import MixtureOfMemories
from memmix.layers import mom as mom_module
from memmix.ops.mom import MoMWeights, naive_mom

from helpers import check_bad_masks_raise, rel_err


def router_conv_by_hand(layer: MixtureOfMemories, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv(x)) with the layer's router_conv1d, along each row's real tokens (pads skipped,
    their output 0), from zeros: x (B, T, D) -> (B, T, D)."""
    weight = layer.router_conv1d.weight[:, 0]  # (D, W)
    W = weight.shape[1]
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        history = [x.new_zeros(x.shape[-1])] * (W - 1)
        for t in range(x.shape[1]):
            if mask is None or mask[b, t]:
                history.append(x[b, t])
                out[b, t] = F.silu((torch.stack(history[-W:]).t() * weight).sum(-1))
    return out


def paper_forward(layer: MixtureOfMemories, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax router (over gate logits / temperature, from x or its short convolution), top-k renormalised, the
    naive mixer loop over the layer's weights (with its conv scope), output gate / norm / projection:
    x (B, T, D) -> (B, T, D). Pads (mask 0) touch nothing."""
    B, T, _ = x.shape
    H, V = layer.num_heads, layer.head_v_dim
    router_in = x if layer.router_input == "token" else router_conv_by_hand(layer, x, mask)
    scores = (layer.gate(router_in).float() / layer.router_temperature).softmax(-1)
    top_w, top_i = scores.topk(layer.topk, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    per_memory = [w for w in (layer.k_proj, layer.v_proj, layer.b_proj, layer.a_proj) if w is not None]
    convs = torch.cat([layer.q_conv1d.weight, layer.k_conv1d.weight, layer.v_conv1d.weight])[:, 0]
    weights = MoMWeights(layer.q_proj.weight, torch.cat(per_memory, dim=1), convs, layer.A_log, layer.dt_bias)
    out, _, _ = naive_mom(x, top_i, top_w, weights, rule=layer.memory_rule, num_heads=H,
                          num_memories=layer.num_memories, shared_memory=layer.shared_mem,
                          valid=None if mask is None else mask.bool(), conv_scope=layer.conv_scope)
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
    dict(router_temperature=2.0),
    dict(router_temperature=0.25, topk=1),
    dict(router_input="conv"),
    dict(conv_scope="sequence"),
    dict(conv_scope="sequence", single_kv_proj=True, memory_rule="gla"),
    dict(router_input="conv", conv_scope="sequence", router_temperature=0.5, conv_size=2),
]
# the ablation options, alone and together, for the state, padding and gradient tests
ABLATIONS = [dict(), dict(router_input="conv"), dict(conv_scope="sequence"),
             dict(router_input="conv", conv_scope="sequence", router_temperature=3.0)]


def _ids(kw: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


@pytest.mark.parametrize("kw", CASES, ids=_ids)
@pytest.mark.parametrize("T", [1, 7, 33])
def test_layer_matches_the_paper(kw, T):
    layer = make_layer(**kw)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    got = layer(x).hidden_states
    assert rel_err(got, paper_forward(layer, x)) < 1e-10


@pytest.mark.parametrize("kw", ABLATIONS, ids=_ids)
def test_padding_touches_nothing(kw):
    layer = make_layer(**kw)
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


@pytest.mark.parametrize("kw", ABLATIONS, ids=_ids)
def test_packed_documents_equal_separate_runs(kw):
    layer = make_layer(**kw)
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
        if layer.router_input == "conv":
            assert rel_err(packed.state.router_conv[i], alone.state.router_conv[0]) < 1e-12


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kw", [dict(), dict(memory_rule="gla"), dict(shared_mem=False, topk=1), *ABLATIONS[1:],
                                dict(router_input="conv", memory_rule="delta", impl="recurrent")], ids=_ids)
def test_state_continuation_and_decoding(kw, padded):
    """Prefill + decoding steps (and prefill + a second chunk) == one full forward: outputs and every state tensor,
    with padding on the left, in a hole, and at a decoding step when padded."""
    layer = make_layer(**kw)
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    mask = torch.ones(2, 40, dtype=torch.long)
    if padded:
        mask[0, :6] = 0
        mask[1, [12, 33]] = 0
    full = layer(x, attention_mask=mask, use_cache=True)
    first = layer(x[:, :30], attention_mask=mask[:, :30], use_cache=True)
    state = first.state
    outs = [first.hidden_states]
    for t in range(30, 40):  # one token at a time (the dense layout)
        step = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], state=state, use_cache=True)
        outs.append(step.hidden_states)
        state = step.state
    chunk = layer(x[:, 30:], attention_mask=mask, state=first.state, use_cache=True)
    for got, final in ((torch.cat(outs, 1), state), (torch.cat([first.hidden_states, chunk.hidden_states], 1),
                                                     chunk.state)):
        assert rel_err(got, full.hidden_states) < 1e-10
        assert rel_err(final.memory, full.state.memory) < 1e-10
        assert rel_err(final.conv, full.state.conv) < 1e-10
        if layer.router_input == "conv":
            assert final.router_conv.shape == (2, layer.conv_size - 1, 16)
            assert rel_err(final.router_conv, full.state.router_conv) < 1e-12
        else:
            assert final.router_conv is None
    assert state.memory_states.shape == (2, layer.num_memories, 2, 4, 4)


@pytest.mark.parametrize("kw", ABLATIONS, ids=_ids)
def test_gradients_reach_every_parameter_and_match_the_paper(kw):
    layer = make_layer(**kw)
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
        (dict(router_temperature=0.0), r"router_temperature must be a number > 0, got 0.0"),
        (dict(router_temperature="2"), r"router_temperature must be a number > 0"),
        (dict(router_input="gate"), r"router_input must be one of \['token', 'conv'\], got 'gate'"),
        (dict(conv_scope="memory"), r"conv_scope must be one of \['segment', 'sequence'\], got 'memory'"),
        # every option checked by the layer itself, as MoMConfig checks it (MoMOptions.check: one check for both)
        (dict(impl="bogus"), r"impl must be one of \['auto', 'naive', 'recurrent', 'chunk', 'triton'\], got 'bogus'"),
        (dict(shared_mem=1), "shared_mem must be True or False"),
        (dict(use_output_gate="yes"), "use_output_gate must be True or False"),
        (dict(norm_eps=0.0), "norm_eps must be a number > 0"),
        (dict(num_heads=True), "num_heads must be a positive integer, got True"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make_layer(**kw)


def test_bad_inputs():
    layer = make_layer()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    check_bad_masks_raise(layer, x)
    with pytest.raises(ValueError, match="state"):
        layer(x, state=layer.init_state(3, dtype=torch.float64))


@pytest.mark.parametrize("kw", ABLATIONS, ids=_ids)
def test_decode_step_with_padding_leaves_that_state_alone(kw):
    layer = make_layer(**kw)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    state = layer(x, use_cache=True).state
    step = torch.randn(2, 1, 16, dtype=torch.float64)
    mask = torch.tensor([[1] * 6 + [0], [1] * 7])
    out = layer(step, attention_mask=mask, state=state, use_cache=True)
    assert torch.equal(out.state.memory[0], state.memory[0]) and torch.equal(out.state.conv[0], state.conv[0])
    if layer.router_input == "conv":
        assert torch.equal(out.state.router_conv[0], state.router_conv[0])
        assert not torch.equal(out.state.router_conv[1], state.router_conv[1])
    assert out.hidden_states[0].abs().max() == 0
    alone = layer(step[1:], state=state.select(torch.tensor([1])), use_cache=True)
    assert rel_err(out.hidden_states[1:], alone.hidden_states) < 1e-12
    assert rel_err(out.state.memory[1:], alone.state.memory) < 1e-12
    # exactly the top-k routed memories and the shared one changed for the real row
    changed = (out.state.memory[1] != state.memory[1]).flatten(1).any(-1)
    picked = out.router_logits[1, 0].topk(layer.topk).indices.tolist() + [layer.num_memories]
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


def test_router_conv_has_its_own_weights_and_state_and_the_options_default_to_the_paper():
    default = make_layer()
    assert (default.router_temperature, default.router_input, default.conv_scope) == (1.0, "token", "segment")
    assert default.router_conv1d is None and default.init_state(2).router_conv is None
    routed = make_layer(router_input="conv", conv_size=3)
    extra = {name: p.shape for name, p in routed.named_parameters()}.items() - {
        name: p.shape for name, p in make_layer(conv_size=3).named_parameters()}.items()
    assert extra == {("router_conv1d.weight", torch.Size([16, 1, 3]))}
    state = routed.init_state(2)
    assert state.router_conv.shape == (2, 2, 16) and state.select(torch.tensor([1, 1, 0])).router_conv.shape == (3, 2, 16)
    copy = state.clone()
    copy.router_conv.fill_(1.0)
    assert state.router_conv.abs().sum() == 0 and state.copy_(copy).router_conv.sum() == 2 * 2 * 16
    with pytest.raises(ValueError, match="router_conv tail"):
        routed(torch.randn(2, 1, 16, dtype=torch.float64), state=default.init_state(2, dtype=torch.float64),
               use_cache=True)


def test_routing_from_the_convolution_and_the_temperature_change_the_routing():
    """The options are not no-ops: the router reads a different input / a tempered softmax."""
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    plain = make_layer()(x)
    routed = make_layer(router_input="conv")
    out = routed(x)
    by_hand = routed.gate(router_conv_by_hand(routed, x, None)).float()
    assert torch.equal(out.router_logits, by_hand) and not torch.allclose(out.router_logits, plain.router_logits)
    hot = make_layer(router_temperature=2.0)(x)
    torch.testing.assert_close(hot.router_logits, plain.router_logits / 2.0)
    assert rel_err(hot.hidden_states, plain.hidden_states) > 1e-3


def test_an_in_place_decoding_step_writes_the_router_tail_too():
    """CUDA-graph decoding replays in-place steps on a static state: the router's tail is written there too."""
    layer = make_layer(router_input="conv", conv_scope="sequence")
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    state = layer(x[:, :7], use_cache=True).state
    want = layer(x[:, 7:], state=state, use_cache=True)
    static = state.clone()
    layer.inplace_decode = True
    got = layer(x[:, 7:], state=static, use_cache=True)
    assert got.state is static and torch.equal(got.hidden_states, want.hidden_states)
    for name in ("memory", "conv", "router_conv"):
        assert torch.equal(getattr(static, name), getattr(want.state, name)), name
