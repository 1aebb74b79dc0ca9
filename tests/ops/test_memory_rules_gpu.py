"""The PyTorch memory-rule paths on CUDA agree with the CPU reference."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from ops_helpers import RULES, call, grad_inputs, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _to_cuda(inputs: dict) -> dict:
    return {n: (None if x is None else x.detach().cuda().requires_grad_(x.requires_grad))
            for n, x in inputs.items()}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_cuda_matches_cpu(rule, impl):
    inputs = make_inputs(rule, lengths=[0, 1, 65, 130, 7], seed=1, requires_grad=True)
    o_cpu, s_cpu = call(rule, inputs, impl="recurrent", output_final_state=True, use_qk_l2norm=True)
    cuda_inputs = _to_cuda(inputs)
    o, s = call(rule, cuda_inputs, impl=impl, output_final_state=True, use_qk_l2norm=True)
    assert o.is_cuda and s.is_cuda
    assert rel_err(o.cpu(), o_cpu) <= 1e-10 and rel_err(s.cpu(), s_cpu) <= 1e-10
    names = grad_inputs(inputs)
    grads_cpu = torch.autograd.grad(o_cpu.sum() + s_cpu.sum(), [inputs[n] for n in names])
    grads = torch.autograd.grad(o.sum() + s.sum(), [cuda_inputs[n] for n in names])
    for name, got, ref in zip(names, grads, grads_cpu):
        assert rel_err(got.cpu(), ref) <= 1e-9, name


@pytest.mark.parametrize("rule", list(RULES))
def test_cuda_bfloat16_auto(rule):
    """impl="auto" on CUDA (Triton where memmix.ops.triton has the rule, else chunk) tracks float64."""
    inputs = make_inputs(rule, lengths=[70, 0, 9], H=2, K=64, V=64, dtype=torch.bfloat16, seed=6)
    o, s = call(rule, _to_cuda(inputs), output_final_state=True, use_qk_l2norm=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    exact = {n: (x.double() if n != "cu_seqlens" else x) for n, x in inputs.items()}
    ref_o, ref_s = call(rule, exact, impl="recurrent", output_final_state=True, use_qk_l2norm=True)
    assert rel_err(o.cpu(), ref_o) <= 2e-2 and rel_err(s.cpu(), ref_s) <= 2e-2
