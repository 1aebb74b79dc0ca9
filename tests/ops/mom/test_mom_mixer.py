"""The MoM mixer op's PyTorch path against the paper's per-token loop (memmix.ops.mom.naive_mom), in float64:
outputs, states and every gradient; decoding steps, padding, packed documents, both layouts, both conv scopes;
sequence_conv; argument checks. The Triton path: test_mom_mixer_interpret.py (CPU interpreter) and
tests/layers/test_mom_gpu.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mom_helpers import WEIGHT_NAMES, make_routing, make_state, make_weights, padding_mask
from helpers import rel_err
from memmix.ops import gated_delta_rule, l2norm
from memmix.ops.mom import MoMWeights, mom_mixer, naive_mom, sequence_conv

# name -> weight options (make_weights) and top-k
CASES = {
    "default": dict(),
    "k1": dict(k=1),
    "k_equals_M": dict(k=4),
    "no_shared": dict(shared=False),
    "single_kv_expand_v2": dict(single_kv=True, V=8),
    "delta": dict(rule="delta"),
    "gla": dict(rule="gla"),
    "linear_conv2": dict(rule="linear", W=2),
    "one_memory": dict(M=1, k=1, shared=False),
}


def _setup(case: dict, B: int, T: int, seed: int, requires_grad: bool = False, conv_scope: str = "segment"):
    """(x, memory_ids, routing_weights, weights, op keywords) for one case."""
    options = {key: value for key, value in case.items() if key != "k"}
    M, shared = options.get("M", 4), options.get("shared", True)
    weights = make_weights(**options, seed=seed, requires_grad=requires_grad)
    ids, routing = make_routing(B, T, M, case.get("k", 2), seed=seed + 1, requires_grad=requires_grad)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(B, T, 16, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
    kwargs = dict(rule=options.get("rule", "gated_delta"), num_heads=2, num_memories=M, shared_memory=shared,
                  conv_scope=conv_scope)
    return x, ids, routing, weights, kwargs


def _both(x, ids, routing, weights, kwargs, impl, **extra):
    """(the op with impl, the naive loop), each (o, memory, conv), same arguments."""
    got = mom_mixer(x, ids, routing, weights, **kwargs, **extra, use_cache=True, impl=impl)
    want = naive_mom(x, ids, routing, weights, **kwargs, **{k: v for k, v in extra.items() if k != "layout"})
    return (got.o, got.memory, got.conv), want


def _assert_close(got, want, bound: float):
    for name, a, b in zip(("o", "memory", "conv"), got, want):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < bound, name


SCOPES = ["segment", "sequence"]


@pytest.mark.parametrize("conv_scope", SCOPES)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_matches_naive_loop(name, T, impl, conv_scope):
    x, ids, routing, weights, kwargs = _setup(CASES[name], B=2, T=T, seed=T, conv_scope=conv_scope)
    _assert_close(*_both(x, ids, routing, weights, kwargs, impl), 1e-10)


@pytest.mark.parametrize("conv_scope", SCOPES)
@pytest.mark.parametrize("name", ["default", "k1", "single_kv_expand_v2", "gla"])
@pytest.mark.parametrize("T", [1, 9, 40])
def test_continues_from_a_state(name, T, conv_scope):
    x, ids, routing, weights, kwargs = _setup(CASES[name], B=3, T=T, seed=5, conv_scope=conv_scope)
    memory, conv = make_state(3, weights, 2, kwargs["num_memories"], kwargs["shared_memory"], seed=6)
    _assert_close(*_both(x, ids, routing, weights, kwargs, "chunk", memory=memory, conv=conv), 1e-10)


@pytest.mark.parametrize("conv_scope", SCOPES)
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("T", [1, 12, 30])
def test_padding_touches_nothing(layout, T, conv_scope):
    x, ids, routing, weights, kwargs = _setup(CASES["default"], B=3, T=T, seed=8, conv_scope=conv_scope)
    memory, conv = make_state(3, weights, 2, 4, True, seed=9)
    valid = padding_mask(3, T)
    got, want = _both(x, ids, routing, weights, kwargs, "chunk", memory=memory, conv=conv, valid=valid,
                      layout=None if T == 1 else layout)
    _assert_close(got, want, 1e-10)
    assert got[0][~valid].abs().max() == 0
    # what a padded token holds changes nothing
    noisy = x.clone()
    noisy[~valid] = 100 * torch.randn_like(noisy[~valid])
    again = mom_mixer(noisy, ids, routing, weights, **kwargs, memory=memory, conv=conv, valid=valid, use_cache=True,
                      layout=None if T == 1 else layout, impl="chunk")
    for a, b in zip((again.o, again.memory, again.conv), got):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("conv_scope", SCOPES)
@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_packed_documents(impl, conv_scope):
    """Documents of lengths 5, 1, 0, 23, 9 (one of them empty) packed in one row: each memory restarts in each."""
    lengths = [5, 1, 0, 23, 9]
    x, ids, routing, weights, kwargs = _setup(CASES["default"], B=1, T=sum(lengths), seed=10, conv_scope=conv_scope)
    cu = torch.tensor([0] + lengths).cumsum(0)
    memory, conv = make_state(len(lengths), weights, 2, 4, True, seed=11)
    _assert_close(*_both(x, ids, routing, weights, kwargs, impl, memory=memory, conv=conv, cu_seqlens=cu), 1e-10)
    # each document alone gives the same
    packed = mom_mixer(x, ids, routing, weights, **kwargs, cu_seqlens=cu, use_cache=True, impl=impl)
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if start == end:
            assert packed.memory[n].abs().max() == 0 and packed.conv[n].abs().max() == 0
            continue
        alone = mom_mixer(x[:, start:end], ids[:, start:end], routing[:, start:end], weights, **kwargs,
                          use_cache=True, impl=impl)
        assert rel_err(packed.o[:, start:end], alone.o) < 1e-12
        assert rel_err(packed.memory[n], alone.memory[0]) < 1e-12 and rel_err(packed.conv[n], alone.conv[0]) < 1e-12


@pytest.mark.parametrize("conv_scope", SCOPES)
def test_dense_and_packed_layouts_agree(conv_scope):
    x, ids, routing, weights, kwargs = _setup(CASES["default"], B=2, T=12, seed=12, conv_scope=conv_scope)
    memory, conv = make_state(2, weights, 2, 4, True, seed=13)
    valid = padding_mask(2, 12)
    runs = [mom_mixer(x, ids, routing, weights, **kwargs, memory=memory, conv=conv, valid=valid, use_cache=True,
                      layout=layout, impl="chunk") for layout in ("dense", "packed")]
    for name in ("o", "memory", "conv"):
        assert rel_err(getattr(runs[0], name), getattr(runs[1], name)) < 1e-12, name


@pytest.mark.parametrize("conv_scope", SCOPES)
def test_split_run_equals_one_run(conv_scope):
    x, ids, routing, weights, kwargs = _setup(CASES["default"], B=2, T=40, seed=14, conv_scope=conv_scope)
    whole = mom_mixer(x, ids, routing, weights, **kwargs, use_cache=True, impl="chunk")
    first = mom_mixer(x[:, :25], ids[:, :25], routing[:, :25], weights, **kwargs, use_cache=True, impl="chunk")
    outputs, memory, conv = [first.o], first.memory, first.conv
    for t in range(25, 40):  # decoding steps
        step = mom_mixer(x[:, t:t + 1], ids[:, t:t + 1], routing[:, t:t + 1], weights, **kwargs, memory=memory,
                         conv=conv, use_cache=True, impl="chunk")
        outputs.append(step.o)
        memory, conv = step.memory, step.conv
    assert rel_err(torch.cat(outputs, 1), whole.o) < 1e-10
    assert rel_err(memory, whole.memory) < 1e-10 and rel_err(conv, whole.conv) < 1e-10


def _grads(fn, x, routing, weights, upstream):
    o, memory, conv = fn()
    loss = (o * upstream[0]).sum() + (memory * upstream[1]).sum() + (conv * upstream[2]).sum()
    leaves = [x, routing] + [getattr(weights, name) for name in WEIGHT_NAMES]
    return dict(zip(("x", "routing_weights") + WEIGHT_NAMES, torch.autograd.grad(loss, leaves, allow_unused=True)))


@pytest.mark.parametrize("conv_scope", SCOPES)
@pytest.mark.parametrize("name, layout, T", [("default", None, 21), ("default", "dense", 9), ("k1", None, 21),
                                             ("gla", None, 21), ("single_kv_expand_v2", None, 18),
                                             ("default", None, 1)])
def test_gradients_match_naive_loop(name, layout, T, conv_scope):
    """Gradients of every input, through outputs and the returned state, with padding and an incoming state."""
    x, ids, routing, weights, kwargs = _setup(CASES[name], B=3, T=T, seed=15, requires_grad=True,
                                              conv_scope=conv_scope)
    memory, conv = make_state(3, weights, 2, kwargs["num_memories"], kwargs["shared_memory"], seed=16)
    valid = padding_mask(3, T) if T > 1 else torch.tensor([[True], [False], [True]])
    extra = dict(memory=memory, conv=conv, valid=valid)
    got, want = _both(x, ids, routing, weights, kwargs, "chunk", layout=layout, **extra)
    gen = torch.Generator().manual_seed(17)
    upstream = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in want]
    fast = _grads(lambda: got, x, routing, weights, upstream)
    slow = _grads(lambda: want, x, routing, weights, upstream)
    for key, reference in slow.items():
        if reference is None:  # A_log / dt_bias of a rule without decay
            assert fast[key] is None, key
            continue
        assert reference.abs().sum() > 0, key
        assert rel_err(fast[key], reference) < 1e-9, key


@pytest.mark.parametrize("conv_scope", SCOPES)
def test_gradients_reach_the_incoming_state(conv_scope):
    """The PyTorch path differentiates the incoming memories and conv tails too."""
    x, ids, routing, weights, kwargs = _setup(CASES["default"], B=2, T=20, seed=18, conv_scope=conv_scope)
    memory, conv = (t.requires_grad_(True) for t in make_state(2, weights, 2, 4, True, seed=19))
    fast = mom_mixer(x, ids, routing, weights, **kwargs, memory=memory, conv=conv, impl="chunk").o
    slow = naive_mom(x, ids, routing, weights, **kwargs, memory=memory, conv=conv)[0]
    fast_grads = torch.autograd.grad(fast.square().sum(), [memory, conv])
    slow_grads = torch.autograd.grad(slow.square().sum(), [memory, conv])
    for got, want in zip(fast_grads, slow_grads):
        assert want.abs().sum() > 0 and rel_err(got, want) < 1e-9


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_decode_step_writes_only_the_picked_memories(inplace, grad):
    """A decode step changes the picked memories of real rows only; inplace writes (and returns) the given
    tensors, otherwise they are left alone. With a gradient wanted the step is differentiable."""
    x, ids, routing, weights, kwargs = _setup(CASES["default"], B=3, T=1, seed=20)
    memory, conv = make_state(3, weights, 2, 4, True, seed=21)
    memory.requires_grad_(grad)
    given = (memory.detach().clone(), conv.clone())
    valid = torch.tensor([[True], [False], [True]])
    bank, tails = (memory.detach().clone(), conv.clone()) if inplace else (memory, conv)
    with torch.set_grad_enabled(grad):
        out = mom_mixer(x, ids, routing, weights, **kwargs, memory=bank, conv=tails, valid=valid, use_cache=True,
                        inplace=inplace, impl="auto")
    want = naive_mom(x, ids, routing, weights, **kwargs, memory=given[0], conv=given[1], valid=valid)
    _assert_close((out.o, out.memory, out.conv), want, 1e-12)
    assert out.memory.requires_grad == (grad and not inplace)
    if inplace:
        assert out.memory is bank and out.conv is tails
    else:
        assert torch.equal(memory.detach(), given[0]) and torch.equal(conv, given[1])
    changed = (out.memory.detach() != given[0]).flatten(2).any(-1)  # (B, P)
    picked = torch.zeros(3, 5, dtype=torch.bool)
    picked[torch.arange(3).unsqueeze(1), ids[:, 0]] = True
    picked[:, 4] = True
    assert torch.equal(changed, picked & valid)


@pytest.mark.parametrize("inplace", [False, True])
def test_sequence_scope_decode_step_moves_every_tail(inplace):
    """conv_scope "sequence": a decoding step moves the conv tail of every memory of a real row (each takes its own
    projection of the token), the states of the picked memories only; padding rows keep everything."""
    x, ids, routing, weights, kwargs = _setup(CASES["default"], B=3, T=1, seed=23, conv_scope="sequence")
    memory, conv = make_state(3, weights, 2, 4, True, seed=24)
    given = (memory.clone(), conv.clone())
    valid = torch.tensor([[True], [False], [True]])
    out = mom_mixer(x, ids, routing, weights, **kwargs, memory=memory, conv=conv, valid=valid, use_cache=True,
                    inplace=inplace, impl="auto")
    want = naive_mom(x, ids, routing, weights, **kwargs, memory=given[0], conv=given[1], valid=valid)
    _assert_close((out.o, out.memory, out.conv), want, 1e-12)
    assert (out.memory is memory and out.conv is conv) == inplace
    tails_moved = (out.conv != given[1]).flatten(2).any(-1)  # (B, P)
    assert torch.equal(tails_moved, valid.expand(3, 5))
    real = valid[:, 0]
    assert torch.equal(out.conv[real, :, :-1], given[1][real, :, 1:])  # shifted by one token in every memory...
    Kd = weights.q_proj.shape[0]
    newest = torch.cat([F.linear(x[:, 0], weights.q_proj).unsqueeze(1).expand(3, 5, Kd),
                        torch.einsum("pfd,bd->bpf", weights.kv_proj, x[:, 0])[..., :2 * Kd]], -1)
    assert rel_err(out.conv[real, :, -1], newest[real]) < 1e-12  # ...each taking its own projection of the token
    changed = (out.memory != given[0]).flatten(2).any(-1)
    picked = torch.zeros(3, 5, dtype=torch.bool)
    picked[torch.arange(3).unsqueeze(1), ids[:, 0]] = True
    picked[:, 4] = True
    assert torch.equal(changed, picked & valid)


@pytest.mark.parametrize("name", ["default", "k1", "no_shared"])
def test_the_conv_scopes_differ_exactly_where_a_memory_skips_tokens(name):
    """Where every memory sees every token (one memory; or k = M with the shared one) both scopes compute the same;
    where a memory skips tokens they differ (the option is not a no-op)."""
    x, ids, routing, weights, kwargs = _setup(CASES[name], B=2, T=15, seed=25)
    runs = [naive_mom(x, ids, routing, weights, **{**kwargs, "conv_scope": scope}) for scope in SCOPES]
    assert rel_err(runs[0][0], runs[1][0]) > 1e-3 and rel_err(runs[0][2], runs[1][2]) > 1e-3
    for case in (CASES["one_memory"], CASES["k_equals_M"]):
        x, ids, routing, weights, kwargs = _setup(case, B=2, T=15, seed=26)
        same = [naive_mom(x, ids, routing, weights, **{**kwargs, "conv_scope": scope}) for scope in SCOPES]
        for a, b in zip(*same):
            assert rel_err(a, b) < 1e-13


def _loop_sequence_conv(x, weight, valid, cu_seqlens, tails):
    """sequence_conv by hand: each sequence (document) keeps a list of its real inputs, starting from its tail."""
    B, T, C = x.shape
    W = weight.shape[1]
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [
        (0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    y = torch.zeros_like(x)
    new_tails = []
    for n, (b, start, end) in enumerate(bounds):
        history = list(tails[n]) if tails is not None else [x.new_zeros(C)] * (W - 1)
        for t in range(start, end):
            if valid[b, t]:
                history.append(x[b, t])
                y[b, t] = F.silu((torch.stack(history[-W:]).t() * weight).sum(-1))
        new_tails.append(torch.stack(history[-(W - 1):]))
    return y, torch.stack(new_tails)


@pytest.mark.parametrize("T, documents, with_tails", [(1, None, True), (1, None, False), (13, None, True),
                                                      (13, None, False), (18, [0, 5, 5, 6, 18], True)])
def test_sequence_conv_matches_a_loop_over_real_tokens(T, documents, with_tails):
    """The short convolution along each sequence's (document's) real tokens, skipping padding, from given tails;
    outputs, tails and gradients (of x, the weights and the tails) against a loop."""
    gen = torch.Generator().manual_seed(T + len(documents or []))
    B = 1 if documents else 3
    N = len(documents) - 1 if documents else B
    x = torch.randn(B, T, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    tails = torch.randn(N, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True) if with_tails else None
    valid = torch.ones(B, T, dtype=torch.bool) if documents else padding_mask(B, T)
    if T == 1:
        valid = torch.tensor([[True], [False], [True]])
    cu = None if documents is None else torch.tensor(documents)
    got = sequence_conv(x, weight, valid, cu, tails)
    want = _loop_sequence_conv(x, weight, valid, cu, tails)
    upstream = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in want]
    leaves = [x, weight] + ([tails] if with_tails else [])
    grads = [torch.autograd.grad(sum((a * u).sum() for a, u in zip(run, upstream)), leaves) for run in (got, want)]
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12
    for a, b in zip(*grads):
        assert b.abs().sum() > 0 and rel_err(a, b) < 1e-12
    if not documents:
        assert got[0][~valid].abs().max() == 0


def test_naive_loop_is_a_convolution_and_the_rule_for_one_memory():
    """One memory, no routing: the naive loop equals a causal conv1d + SiLU over the sequence, then the gated delta
    rule op (checked against its own step loop in tests/ops/test_memory_rules.py)."""
    x, ids, routing, weights, kwargs = _setup(CASES["one_memory"], B=2, T=15, seed=22)
    o, memory, conv = naive_mom(x, ids, routing, weights, **kwargs)
    Kd, W = weights.q_proj.shape[0], weights.conv.shape[1]
    proj = F.linear(x, weights.kv_proj[0])  # (B, T, Kd + Vd + 2H)
    inputs = torch.cat([F.linear(x, weights.q_proj), proj[..., :2 * Kd]], -1)  # q | k | v, (B, T, C)
    C = inputs.shape[-1]
    conv_out = F.silu(F.conv1d(inputs.transpose(1, 2), weights.conv.unsqueeze(1), padding=W - 1, groups=C)[..., :15])
    q, k, v = conv_out.transpose(1, 2).split([Kd, Kd, Kd], -1)
    beta = proj[..., 2 * Kd:2 * Kd + 2].sigmoid()
    g = -weights.A_log.exp() * F.softplus(proj[..., 2 * Kd + 2:] + weights.dt_bias)
    want_o, want_state = gated_delta_rule(l2norm(q.view(2, 15, 2, 4)), l2norm(k.view(2, 15, 2, 4)),
                                          v.reshape(2, 15, 2, 4), g, beta, output_final_state=True, impl="recurrent")
    assert rel_err(o, want_o.reshape(2, 15, 8)) < 1e-12
    assert rel_err(memory[:, 0], want_state) < 1e-12
    assert rel_err(conv[:, 0], inputs[:, -(W - 1):]) < 1e-12


def _bad(name: str):
    """The op's arguments with one broken, and the words its error must say."""
    x, ids, routing, weights, kwargs = _setup(CASES["default"], B=2, T=5, seed=0)
    extra = {}
    memory, conv = make_state(2, weights, 2, 4, True)
    if name == "impl":
        extra["impl"], match = "fused", "impl must be one of"
    elif name == "rule":
        kwargs["rule"], match = "mamba", "rule must be one of"
    elif name == "layout":
        extra["layout"], match = "ragged", "layout must be None or one of"
    elif name == "dense_with_cu_seqlens":
        x, ids, routing = x[:1], ids[:1], routing[:1]
        extra.update(layout="dense", cu_seqlens=torch.tensor([0, 2, 5]))
        match = "layout='dense' does not take cu_seqlens"
    elif name == "x":
        x, match = x[0], "x must be a floating-point \\(B, T, D\\)"
    elif name == "memory_ids":
        ids, match = ids.float(), "memory_ids must be an integer"
    elif name == "routing_weights":
        routing, match = routing[..., :1], "routing_weights must have memory_ids' shape"
    elif name == "kv_proj":
        weights = MoMWeights(weights.q_proj, weights.kv_proj[:, :-2], weights.conv, weights.A_log, weights.dt_bias)
        match = "weights.kv_proj must be"
    elif name == "conv":
        weights = MoMWeights(weights.q_proj, weights.kv_proj, weights.conv[:, :1], weights.A_log, weights.dt_bias)
        match = "weights.conv must be"
    elif name == "A_log":
        weights = MoMWeights(weights.q_proj, weights.kv_proj, weights.conv)
        match = "weights.A_log and weights.dt_bias"
    elif name == "memory_without_conv":
        extra["memory"], match = memory, "memory and conv must be given together"
    elif name == "state_shape":
        extra.update(memory=memory[:, :4], conv=conv[:, :4])
        match = "state must be memory \\(N, P, H, K, V\\)"
    elif name == "state_sequences":
        extra.update(memory=memory[:1], conv=conv[:1])
        match = "state holds 1 sequences but the input has 2"
    elif name == "valid":
        extra["valid"], match = torch.ones(2, 5), "valid must be a bool \\(B, T\\)"
    elif name == "cu_seqlens_batch":
        extra["cu_seqlens"], match = torch.tensor([0, 5]), "cu_seqlens needs a packed batch"
    elif name == "low_memory":
        extra["low_memory"], match = 1, "low_memory must be True or False"
    elif name == "conv_scope":
        extra["conv_scope"], match = "memory", "conv_scope must be one of \\('segment', 'sequence'\\)"
    return (x, ids, routing, weights), {**kwargs, **extra}, match


@pytest.mark.parametrize("name", ["impl", "rule", "layout", "dense_with_cu_seqlens", "x", "memory_ids",
                                  "routing_weights", "kv_proj", "conv", "A_log", "memory_without_conv",
                                  "state_shape", "state_sequences", "valid", "cu_seqlens_batch", "low_memory",
                                  "conv_scope"])
def test_bad_arguments_name_themselves(name):
    args, kwargs, match = _bad(name)
    with pytest.raises(ValueError, match=match):
        mom_mixer(*args, **kwargs)
