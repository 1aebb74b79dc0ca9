"""The fused gated RMSNorm kernels under Triton's CPU interpreter against the PyTorch GatedRMSNorm in float64:
output and the gradients of x, gate and weight.

TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in a child process (this file as a
script prints one JSON object of relative errors) and the tests check them.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import print_case_results, rel_err

# name -> input shape (..., D); rows not a multiple of the 16-row tile, D not a power of two
CASES = {
    "rows37_D16": (37, 16),
    "heads_D24": (2, 3, 5, 24),
    "one_row_D256": (1, 256),
}
TOLERANCE = 1e-5


def run_case(name: str, seed: int) -> dict:
    from memmix.layers.norms import GatedRMSNorm
    from memmix.ops.triton.gated_rms_norm import gated_rms_norm

    shape = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x, gate, upstream = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    norm = GatedRMSNorm(shape[-1], eps=1e-5).double()
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(shape[-1], generator=gen, dtype=torch.float64))
    results = {}
    for label, fn, dtype in (("reference", norm, torch.float64), ("kernel", None, torch.float32)):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, gate, norm.weight.detach())]
        if fn is None:
            y = gated_rms_norm(leaves[0], leaves[1], leaves[2], norm.eps)
        else:
            with torch.no_grad():
                norm.weight.copy_(leaves[2])
            y = fn(leaves[0], leaves[1])
            leaves[2] = norm.weight
        grads = torch.autograd.grad((y.double() * upstream).sum(), leaves)
        results[label] = {"y": y.double(), **{f"d{n}": g.double() for n, g in zip(("x", "gate", "weight"), grads)}}
    return {key: rel_err(results["kernel"][key], results["reference"][key]) for key in results["reference"]}


INTERPRET_TIMEOUT = 120


@pytest.mark.parametrize("name", list(CASES))
def test_fused_gated_rms_norm_matches_pytorch_under_interpreter(interpret_results, name):
    errors = interpret_results[name]
    assert set(errors) == {"y", "dx", "dgate", "dweight"}
    bad = {key: err for key, err in errors.items() if not err <= TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


def test_fused_gated_rms_norm_rejects_mismatched_shapes():
    pytest.importorskip("triton")
    from memmix.ops.triton.gated_rms_norm import gated_rms_norm

    with pytest.raises(ValueError, match="x and gate must share a shape"):
        gated_rms_norm(torch.zeros(2, 8), torch.zeros(2, 4), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        gated_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(4), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_gated_rms_norm_on_gpu(dtype):
    from memmix.layers.norms import GatedRMSNorm

    torch.manual_seed(0)
    x, gate, upstream = (torch.randn(4099, 4, 256, device="cuda", dtype=torch.float64) for _ in range(3))
    norm = GatedRMSNorm(256).cuda()
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn_like(norm.weight))
    results = []
    for cast in (torch.float64, dtype):  # float64: the PyTorch form (the fused path takes 16/32-bit floats only)
        module = copy.deepcopy(norm).to(cast)
        leaves = [x.to(cast).requires_grad_(True), gate.to(cast).requires_grad_(True)]
        y = module(*leaves)
        grads = torch.autograd.grad((y.double() * upstream).sum(), leaves + [module.weight])
        results.append([y] + list(grads))
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    errors = [rel_err(a.double(), b) for a, b in zip(results[1], results[0])]
    assert max(errors) <= tolerance, errors


if __name__ == "__main__":
    print_case_results(run_case, CASES)
