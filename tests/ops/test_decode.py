"""memory_step's PyTorch path against a per-(slot, head) loop and against the rule ops over several tokens;
argument checks and the auto dispatch. The Triton path: test_decode_interpret.py and test_decode_gpu.py."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import rel_err
from ops_helpers import RULES, make_step_inputs, naive_memory_step
from memmix.ops import decode, memory_step, registry
from memmix.ops.registry import Kernel

ALL_RULES = list(RULES)
ARG_NAMES = ("q", "k", "v", "g", "beta", "bank", "index", "keep")


def _step(rule: str, inputs: dict, **kwargs) -> torch.Tensor:
    return memory_step(rule, *(inputs[name] for name in ARG_NAMES), **kwargs)


def _untouched(inputs: dict) -> torch.Tensor:
    """(slots,) bool: the bank rows a step must leave bit-identical (not picked, or picked with keep False)."""
    written = torch.zeros(inputs["bank"].shape[0], dtype=torch.bool)
    written[inputs["index"][inputs["keep"]]] = True
    return ~written


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("bank_dtype, bound", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_recurrent_step_matches_naive_loop(rule, bank_dtype, bound, scale):
    inputs = make_step_inputs(rule, N=6, H=2, K=5, V=7, slots=9, bank_dtype=bank_dtype, seed=len(rule))
    original = inputs["bank"].clone()
    expected_o, expected_bank = naive_memory_step(rule, *(inputs[name] for name in ARG_NAMES), scale=scale)
    o = _step(rule, inputs, scale=scale, impl="recurrent")
    assert o.shape == (6, 2, 7) and o.dtype == torch.float64
    assert rel_err(o, expected_o) <= bound
    assert rel_err(inputs["bank"], expected_bank) <= bound
    untouched = _untouched(inputs)
    assert torch.equal(inputs["bank"][untouched], original[untouched])
    assert not torch.equal(inputs["bank"][~untouched], original[~untouched])


@pytest.mark.parametrize("rule", ALL_RULES)
def test_steps_equal_the_rule_over_the_tokens(rule):
    """T steps of one slot per sequence give the chunked rule's outputs and final states (use_qk_l2norm)."""
    B, T, H, K, V = 3, 5, 2, 6, 4
    record = RULES[rule]
    takes_g, takes_beta = record.uses_gate, record.uses_beta
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) if takes_g else None
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) if takes_beta else None
    initial = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    args = [x for x in (q, k, v, g, beta) if x is not None]
    expected_o, expected_state = record.op(*args, initial_state=initial, output_final_state=True, use_qk_l2norm=True,
                                    impl="chunk")
    bank = torch.cat([initial, torch.zeros_like(initial)])  # sequences in rows 0..B-1, unused rows after
    index, keep = torch.arange(B), torch.ones(B, dtype=torch.bool)
    outputs = [memory_step(rule, q[:, t], k[:, t], v[:, t], None if g is None else g[:, t],
                           None if beta is None else beta[:, t], bank, index, keep, impl="recurrent")
               for t in range(T)]
    assert rel_err(torch.stack(outputs, 1), expected_o) <= 1e-12
    assert rel_err(bank[:B], expected_state) <= 1e-12
    assert bank[B:].abs().max() == 0


def test_auto_on_cpu_is_the_recurrent_path():
    inputs = make_step_inputs("gated_delta_rule", bank_dtype=torch.float32, dtype=torch.float32)
    twin = {name: None if x is None else x.clone() for name, x in inputs.items()}
    o = _step("gated_delta_rule", inputs)
    assert torch.equal(o, _step("gated_delta_rule", twin, impl="recurrent"))
    assert torch.equal(inputs["bank"], twin["bank"])


@pytest.mark.parametrize("case, expected", [
    ("float32", "triton"),
    ("bfloat16_inputs", "triton"),
    ("float64_bank", "recurrent"),
    ("float64_inputs", "recurrent"),
    ("grad_wanted", "recurrent"),
    ("K_above_256", "recurrent"),
])
def test_auto_takes_triton_only_for_float32_states_up_to_K256_without_grad(monkeypatch, case, expected):
    taken = []
    # a step kernel that runs anywhere, limited to K <= 256 and forward only, as the Triton one
    kernel = Kernel(lambda *args: taken.append("triton"), runs_on=lambda *tensors: True, max_head_dim=256,
                    differentiable=False)
    monkeypatch.setitem(registry._RULES, "delta_rule", replace(registry.get_rule("delta_rule"), step_kernel=kernel))
    monkeypatch.setattr(decode, "recurrent_memory_step", lambda *args: taken.append("recurrent"))
    dtype = {"bfloat16_inputs": torch.bfloat16, "float64_inputs": torch.float64}.get(case, torch.float32)
    bank_dtype = torch.float64 if case == "float64_bank" else torch.float32
    inputs = make_step_inputs("delta_rule", K=272 if case == "K_above_256" else 8, dtype=dtype, bank_dtype=bank_dtype)
    if case == "grad_wanted":
        inputs["q"].requires_grad_(True)
    _step("delta_rule", inputs)
    assert taken == [expected]


def test_triton_needs_a_float32_bank_and_cuda():
    inputs = make_step_inputs("linear_attention", bank_dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 bank"):
        _step("linear_attention", inputs, impl="triton")
    kernel = registry.get_rule("linear_attention").step_kernel
    if kernel is None or not kernel.runs_on(inputs["q"]):
        inputs["bank"] = inputs["bank"].float()
        with pytest.raises(RuntimeError, match="CUDA"):
            _step("linear_attention", inputs, impl="triton")


def _bad(name: str):
    """Arguments of a gated_delta_rule step (N=6, H=2, K=8, V=6) with one of them broken, and the error's words."""
    inputs = make_step_inputs("gated_delta_rule")
    rule, kwargs = "gated_delta_rule", {}
    if name == "rule":
        rule, match = "mamba", "rule must be one of"
    elif name == "impl":
        kwargs["impl"], match = "chunk", "impl must be one of"
    elif name == "g_missing":
        inputs["g"], match = None, "g must be a floating-point \\(N, H\\)"
    elif name == "g_not_taken":
        rule, match = "delta_rule", "g must be None for rule 'delta_rule'"
    elif name == "beta_shape":
        inputs["beta"], match = inputs["beta"][:, :1], "beta must be a floating-point \\(N, H\\)"
    elif name == "k_shape":
        inputs["k"], match = inputs["k"][:, :, :4], "k must be \\(N, H, K\\)"
    elif name == "v_dims":
        inputs["v"], match = inputs["v"][0], "v must be a 3-D floating-point tensor"
    elif name == "dtypes":
        inputs["v"], match = inputs["v"].float(), "share one dtype"
    elif name == "bank_shape":
        inputs["bank"], match = inputs["bank"][..., :3], "bank must be \\(slots, H, K, V\\)"
    elif name == "index_dtype":
        inputs["index"], match = inputs["index"].float(), "index must be an \\(N,\\)"
    elif name == "keep_dtype":
        inputs["keep"], match = inputs["keep"].long(), "keep must be an \\(N,\\) = \\(6,\\) bool tensor"
    elif name == "scale":
        kwargs["scale"], match = "0.1", "scale must be None or a number"
    return rule, inputs, kwargs, match


@pytest.mark.parametrize("name", ["rule", "impl", "g_missing", "g_not_taken", "beta_shape", "k_shape", "v_dims",
                                  "dtypes", "bank_shape", "index_dtype", "keep_dtype", "scale"])
def test_validation_errors(name):
    rule, inputs, kwargs, match = _bad(name)
    with pytest.raises(ValueError, match=match):
        _step(rule, inputs, **kwargs)
