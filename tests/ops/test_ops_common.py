"""Argument validation, impl dispatch and l2norm of the memory-rule ops."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from ops_helpers import RULES, call, make_inputs
from memmix.ops import gated_delta_rule, l2norm
from memmix.ops.common import resolve_impl
from memmix.ops.registry import get_rule


def test_l2norm():
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    y = l2norm(x)
    assert torch.allclose(y, x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt())
    assert torch.allclose(y.norm(dim=-1), torch.ones(3, 5, dtype=torch.float64), atol=1e-6)
    assert l2norm(x.bfloat16()).dtype == torch.bfloat16


def test_l2norm_is_applied_inside():
    """use_qk_l2norm equals normalising q and k beforehand, and rescaling q or k barely moves the output (eps aside)."""
    inputs = make_inputs("gated_delta_rule", seed=1)
    o = call("gated_delta_rule", inputs, impl="chunk", use_qk_l2norm=True)[0]
    pre = {**inputs, "q": l2norm(inputs["q"]), "k": l2norm(inputs["k"])}
    assert torch.allclose(o, call("gated_delta_rule", pre, impl="chunk")[0], rtol=1e-12, atol=1e-12)
    scaled = {**inputs, "q": 3 * inputs["q"], "k": 2 * inputs["k"]}
    assert not torch.allclose(o, call("gated_delta_rule", scaled, impl="chunk")[0])
    assert rel_err(call("gated_delta_rule", scaled, impl="chunk", use_qk_l2norm=True)[0], o) <= 1e-5


def test_default_scale_is_inverse_sqrt_k():
    inputs = make_inputs("linear_attention", K=16, seed=2)
    default = call("linear_attention", inputs, impl="recurrent")[0]
    assert torch.allclose(default, call("linear_attention", inputs, impl="recurrent", scale=0.25)[0])
    assert not torch.allclose(default, call("linear_attention", inputs, impl="recurrent", scale=0.5)[0])


def test_auto_dispatch_on_cpu():
    def q(T):
        return torch.zeros(1, T, 2, 4)

    assert resolve_impl("auto", get_rule("gated_delta_rule"), q(8)) == "recurrent"
    assert resolve_impl("auto", get_rule("gated_delta_rule"), q(9)) == "chunk"
    assert resolve_impl("chunk", get_rule("gated_delta_rule"), q(1)) == "chunk"
    inputs = make_inputs("gated_delta_rule", T=20, seed=3)
    auto = call("gated_delta_rule", inputs)[0]
    assert torch.allclose(auto, call("gated_delta_rule", inputs, impl="chunk")[0], rtol=0, atol=0)


def test_triton_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs("gated_delta_rule", seed=0)
    with pytest.raises(RuntimeError, match="triton"):
        call("gated_delta_rule", inputs, impl="triton")


def _gdr_args(**overrides):
    B, T, H, K, V = 1, 6, 2, 4, 3
    args = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                g=-torch.rand(B, T, H), beta=torch.rand(B, T, H))
    args.update(overrides)
    return args


def _run(kwargs=None, **overrides):
    args = _gdr_args(**overrides)
    return gated_delta_rule(args["q"], args["k"], args["v"], args["g"], args["beta"], **(kwargs or {}))


@pytest.mark.parametrize("overrides, kwargs, match", [
    ({"q": torch.randn(6, 2, 4)}, None, "q must be 4-D"),
    ({"k": torch.randn(1, 6, 2, 5)}, None, "k must have q's shape"),
    ({"v": torch.randn(1, 5, 2, 3)}, None, "v must have shape"),
    ({"v": torch.randn(1, 6, 2, 3, dtype=torch.float64)}, None, "q, k and v must share one dtype"),
    ({"q": torch.ones(1, 6, 2, 4, dtype=torch.long)}, None, "q must be a floating-point"),
    ({"g": torch.rand(1, 6, 3)}, None, "g must have shape"),
    ({"g": None}, None, "g must be a torch.Tensor"),
    ({"beta": torch.rand(1, 6)}, None, "beta must be 3-D"),
    ({}, {"impl": "fused"}, "impl must be one of"),
    ({}, {"scale": "big"}, "scale must be None or a number"),
    ({}, {"initial_state": torch.zeros(2, 2, 4, 3)}, r"initial_state must have shape \(N, H, K, V\) = \(1,"),
    ({}, {"initial_state": torch.zeros(1, 2, 3, 4)}, "initial_state must have shape"),
    ({}, {"cu_seqlens": torch.tensor([0, 2, 6]), "initial_state": torch.zeros(1, 2, 4, 3)},
     r"initial_state must have shape \(N, H, K, V\) = \(2,"),
    ({}, {"cu_seqlens": torch.tensor([0.0, 6.0])}, "cu_seqlens must have an integer dtype"),
    ({}, {"cu_seqlens": torch.tensor([[0, 6]])}, "cu_seqlens must be a 1-D integer tensor"),
    ({}, {"cu_seqlens": torch.tensor([6])}, "cu_seqlens must have length N"),
    ({}, {"cu_seqlens": torch.tensor([1, 6])}, "cu_seqlens must start at 0"),
    ({}, {"cu_seqlens": torch.tensor([0, 5])}, "cu_seqlens must end at T"),
    ({}, {"cu_seqlens": torch.tensor([0, 4, 2, 6])}, "cu_seqlens must be non-decreasing"),
])
def test_validation_errors(overrides, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(kwargs, **overrides)


def test_cu_seqlens_needs_packed_batch():
    args = _gdr_args(**{name: x.expand(2, *x.shape[1:]) for name, x in _gdr_args().items()})
    with pytest.raises(ValueError, match="cu_seqlens requires a packed batch with B == 1"):
        gated_delta_rule(*args.values(), cu_seqlens=torch.tensor([0, 6]))


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_validates(rule):
    inputs = make_inputs(rule, seed=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        call(rule, inputs, impl="naive")
    with pytest.raises(ValueError, match="initial_state"):
        call(rule, {**inputs, "initial_state": torch.zeros(3, 2, 8, 6, dtype=torch.float64)})


def test_fit_chunk_size_shrinks_only_for_short_inputs():
    from memmix.ops.common import fit_chunk_size

    assert [fit_chunk_size(64, L) for L in (0, 1, 8, 9, 17, 32, 33, 64, 65, 4096)] == [8, 8, 8, 16, 32, 32, 64, 64, 64, 64]


def test_fit_chunk_size_shrinks_for_many_rows():
    from memmix.ops.common import fit_chunk_size

    assert [fit_chunk_size(64, 4096, rows) for rows in (1, 16, 17, 64, 65, 1000)] == [64, 64, 32, 32, 16, 16]
    assert fit_chunk_size(64, 9, rows=1000) == 16 and fit_chunk_size(64, 5, rows=1000) == 8
