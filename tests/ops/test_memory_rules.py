"""Chunkwise-parallel memory rules against the step-loop references: outputs, states, gradients, carry, dtypes."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from ops_helpers import RULES, call, grad_inputs, make_inputs

ALL_RULES = list(RULES)
# Varlen with empty segments (first, middle, last), a 1-token one, and lengths around the chunk size.
VARLEN = [0, 1, 65, 0, 130, 63, 64, 0]


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("T", [1, 7, 9, 17, 33, 63, 64, 65, 130])  # short T: chunks of 8, 16, 32
@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_chunk_matches_recurrent_dense(rule, T, use_qk_l2norm):
    inputs = make_inputs(rule, B=2, T=T, seed=T)
    ref_o, ref_s = call(rule, inputs, impl="recurrent", output_final_state=True, use_qk_l2norm=use_qk_l2norm)
    o, s = call(rule, inputs, impl="chunk", output_final_state=True, use_qk_l2norm=use_qk_l2norm)
    assert o.shape == (2, T, 2, 6) and s.shape == (2, 2, 8, 6)
    assert rel_err(o, ref_o) <= 1e-10
    assert rel_err(s, ref_s) <= 1e-10


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("B", [10, 40])  # 20 and 80 (sequence, head) rows: CPU chunks of 32 and 16
def test_chunk_matches_recurrent_with_many_rows(rule, B):
    inputs = make_inputs(rule, B=B, T=70, seed=B, requires_grad=True)
    ref_o, ref_s = call(rule, inputs, impl="recurrent", output_final_state=True)
    o, s = call(rule, inputs, impl="chunk", output_final_state=True)
    assert rel_err(o, ref_o) <= 1e-10 and rel_err(s, ref_s) <= 1e-10
    names = grad_inputs(inputs)
    grads = torch.autograd.grad(o.sum() + s.sum(), [inputs[n] for n in names])
    ref_grads = torch.autograd.grad(ref_o.sum() + ref_s.sum(), [inputs[n] for n in names])
    for name, got, ref in zip(names, grads, ref_grads):
        assert rel_err(got, ref) <= 1e-9, name


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("use_qk_l2norm", [False, True])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_matches_recurrent_varlen(rule, use_qk_l2norm, initial_state):
    inputs = make_inputs(rule, lengths=VARLEN, initial_state=initial_state, seed=7)
    kwargs = dict(output_final_state=True, use_qk_l2norm=use_qk_l2norm, scale=0.37)
    ref_o, ref_s = call(rule, inputs, impl="recurrent", **kwargs)
    o, s = call(rule, inputs, impl="chunk", **kwargs)
    assert o.shape == (1, sum(VARLEN), 2, 6) and s.shape == (len(VARLEN), 2, 8, 6)
    assert rel_err(o, ref_o) <= 1e-10
    assert rel_err(s, ref_s) <= 1e-10


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_varlen_equals_separate_runs(rule, impl):
    """Each packed segment behaves as its own sequence: states reset at boundaries."""
    lengths = [3, 0, 70, 1]
    inputs = make_inputs(rule, lengths=lengths, seed=3)
    o, s = call(rule, inputs, impl=impl, output_final_state=True)
    bounds = inputs["cu_seqlens"].tolist()
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = {name: (x[n:n + 1] if name == "initial_state" else x[:, start:end])
                 for name, x in inputs.items() if name != "cu_seqlens" and x is not None}
        o_n, s_n = call(rule, piece, impl=impl, output_final_state=True)
        assert rel_err(o[:, start:end], o_n) <= 1e-12
        assert rel_err(s[n:n + 1], s_n) <= 1e-12


@pytest.mark.parametrize("rule", ALL_RULES)
def test_empty_and_no_initial_state(rule):
    """Empty segments keep the initial state (zeros when None); final_state is None unless asked for."""
    inputs = make_inputs(rule, lengths=[0, 0], seed=1)
    for impl in ("recurrent", "chunk"):
        o, s = call(rule, inputs, impl=impl, output_final_state=True)
        assert o.shape == (1, 0, 2, 6)
        assert torch.equal(s, inputs["initial_state"])
    dense_empty = make_inputs(rule, B=2, T=0, seed=1)
    o, s = call(rule, dense_empty, impl="chunk", output_final_state=True)
    assert o.shape == (2, 0, 2, 6) and torch.equal(s, dense_empty["initial_state"])
    inputs = make_inputs(rule, lengths=[0, 5], initial_state=False, seed=1)
    o, s = call(rule, inputs, impl="chunk", output_final_state=True)
    assert torch.count_nonzero(s[0]) == 0 and torch.count_nonzero(s[1]) > 0
    assert call(rule, inputs, impl="chunk")[1] is None


def _grads(rule, inputs, impl, weights):
    o, s = call(rule, inputs, impl=impl, output_final_state=True, use_qk_l2norm=True)
    loss = (o * weights[0]).sum() + (s * weights[1]).sum()
    names = grad_inputs(inputs)
    return dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names])))


@pytest.mark.parametrize("rule", ALL_RULES)
def test_chunk_grads_match_recurrent_varlen(rule):
    lengths = [0, 1, 65, 70, 2]
    inputs = make_inputs(rule, lengths=lengths, seed=11, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    weights = (torch.randn(1, sum(lengths), 2, 6, generator=gen, dtype=torch.float64),
               torch.randn(len(lengths), 2, 8, 6, generator=gen, dtype=torch.float64))
    ref = _grads(rule, inputs, "recurrent", weights)
    got = _grads(rule, inputs, "chunk", weights)
    assert set(got) == set(ref) == set(grad_inputs(inputs))
    for name in ref:
        assert ref[name].abs().sum() > 0, name
        assert rel_err(got[name], ref[name]) <= 1e-9, name


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_gradcheck(rule, impl):
    """Finite differences through every input, initial_state included, across a varlen boundary."""
    inputs = make_inputs(rule, lengths=[2, 0, 3], H=1, K=3, V=2, seed=2, requires_grad=True)
    names = grad_inputs(inputs)

    def fn(*tensors):
        o, s = call(rule, {**inputs, **dict(zip(names, tensors))}, impl=impl, output_final_state=True,
                    use_qk_l2norm=True, scale=0.8)
        return o, s

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names])


@pytest.mark.parametrize("rule", ALL_RULES)
def test_gradcheck_chunk_across_chunks(rule):
    """Fast-mode finite differences through the chunk path over two chunks (state pass included)."""
    inputs = make_inputs(rule, B=1, T=70, H=1, K=2, V=2, seed=4, requires_grad=True)
    names = grad_inputs(inputs)

    def fn(*tensors):
        return call(rule, {**inputs, **dict(zip(names, tensors))}, impl="chunk", output_final_state=True)

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names], fast_mode=True)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_state_carry(rule, impl):
    """Two pieces, the first's final state fed to the second, equal one run."""
    inputs = make_inputs(rule, B=2, T=100, seed=9)
    split = 37
    full_o, full_s = call(rule, inputs, impl=impl, output_final_state=True)
    first = {n: (x if n == "initial_state" else x[:, :split]) for n, x in inputs.items() if x is not None}
    second = {n: x[:, split:] for n, x in inputs.items() if x is not None and n != "initial_state"}
    o1, s1 = call(rule, first, impl=impl, output_final_state=True)
    o2, s2 = call(rule, {**second, "initial_state": s1}, impl=impl, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], dim=1), full_o) <= 1e-12
    assert rel_err(s2, full_s) <= 1e-12


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_low_precision(rule, impl, dtype, bound):
    """Half inputs: o keeps v's dtype, the state is float32, values track a float64 run of the same inputs."""
    inputs = make_inputs(rule, lengths=[70, 0, 9], dtype=dtype, seed=6)
    o, s = call(rule, inputs, impl=impl, output_final_state=True, use_qk_l2norm=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    exact = {n: (x.double() if n != "cu_seqlens" else x) for n, x in inputs.items()}
    ref_o, ref_s = call(rule, exact, impl="recurrent", output_final_state=True, use_qk_l2norm=True)
    assert ref_s.dtype == torch.float64
    assert rel_err(o, ref_o) <= bound
    assert rel_err(s, ref_s) <= bound
