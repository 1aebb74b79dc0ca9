"""The Triton recurrent_step kernel at decoding size on CUDA (B = 16 sequences x (top-2 + shared) = 48 slots,
4 heads of 256 x 256 states) against memory_step's PyTorch path in float64, bf16 and fp32 inputs."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from ops_helpers import RULES, make_step_inputs
from memmix.ops import memory_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ARG_NAMES = ("q", "k", "v", "g", "beta", "bank", "index", "keep")
# the states are float32 either way; bf16 rounds the output itself (relative step 2^-8)
TOLERANCE = {torch.float32: {"o": 1e-5, "bank": 1e-5}, torch.bfloat16: {"o": 1e-2, "bank": 1e-5}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rule", list(RULES))
def test_kernel_matches_float64_step_at_decode_size(rule, dtype):
    inputs = make_step_inputs(rule, N=48, H=4, K=256, V=256, slots=80, dtype=dtype, bank_dtype=torch.float32,
                              seed=len(rule), device="cuda")
    reference = {name: x if x is None or name in ("index", "keep") else x.double() for name, x in inputs.items()}
    original = inputs["bank"].clone()
    expected_o = memory_step(rule, *(reference[name] for name in ARG_NAMES), impl="recurrent")
    o = memory_step(rule, *(inputs[name] for name in ARG_NAMES), impl="triton")
    assert o.dtype == dtype and o.shape == (48, 4, 256)
    assert rel_err(o, expected_o) <= TOLERANCE[dtype]["o"]
    assert rel_err(inputs["bank"], reference["bank"]) <= TOLERANCE[dtype]["bank"]
    written = torch.zeros(80, dtype=torch.bool, device="cuda")
    written[inputs["index"][inputs["keep"]]] = True
    assert torch.equal(inputs["bank"][~written], original[~written])
    assert not torch.equal(inputs["bank"][written], original[written])


def test_auto_takes_the_kernel_without_grad_and_a_cuda_graph_replays_it():
    """auto on CUDA without gradients is the kernel (bit-identical to impl="triton"); a captured step replays it."""
    inputs = make_step_inputs("gated_delta_rule", N=48, H=4, K=256, V=256, slots=80, dtype=torch.bfloat16,
                              bank_dtype=torch.float32, device="cuda")
    bank = inputs["bank"]

    def step(bank: torch.Tensor, impl: str) -> torch.Tensor:
        return memory_step("gated_delta_rule", *(bank if name == "bank" else inputs[name] for name in ARG_NAMES),
                           impl=impl)

    twin = bank.clone()
    with torch.no_grad():
        o = step(bank, "auto")
    assert torch.equal(o, step(twin, "triton")) and torch.equal(bank, twin)

    start, stepped_twice = bank.clone(), bank.clone()
    step(stepped_twice, "triton")
    step(stepped_twice, "triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        step(bank, "triton")
    bank.copy_(start)
    graph.replay()
    graph.replay()
    assert torch.equal(bank, stepped_twice) and not torch.equal(bank, start)
