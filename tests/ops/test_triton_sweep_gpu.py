"""Every delta-rule Triton kernel over head sizes, dtypes and (sequence, head) counts, against the float64 PyTorch
chunk form: outputs, final states and every gradient, with empty and one-token segments in every varlen batch.

Run it under `compute-sanitizer --tool memcheck python -m pytest -m gpu tests/ops/test_triton_sweep_gpu.py` after
every kernel change: an out-of-bounds access there is a defect even when the numbers come out right.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import forced_sequence_form, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-3}
HEAD_DIMS = (16, 32, 64, 128, 256)
FORMS = ("chunked", "recurrent")  # the sequence form, forced
# (sequence, head) pairs -> (lengths, heads); every varlen batch holds empty and one-token sequences
PAIRS = {
    1: ([37], 1),
    64: ([0, 1, 5, 64, 65, 130, 17, 300], 8),
    4096: (None, 8),  # 512 sequences of 0 .. 40 tokens
}


def _lengths(pairs: int, seed: int) -> tuple[list[int], int]:
    lengths, heads = PAIRS[pairs]
    if lengths is None:
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, 41, (512,), generator=gen).tolist()
        lengths[:2] = [0, 1]
    return lengths, heads


def _case(K: int, V: int, pairs: int, dtype: torch.dtype, seed: int):
    lengths, H = _lengths(pairs, seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    T, N = sum(lengths), len(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    inputs = {"q": rand(1, T, H, K), "k": F.normalize(rand(1, T, H, K), dim=-1), "v": rand(1, T, H, V),
              "g": F.logsigmoid(rand(1, T, H) + 2.0), "beta": torch.sigmoid(rand(1, T, H)),
              "initial_state": rand(N, H, K, V)}
    inputs = {n: x if n == "initial_state" else x.to(dtype) for n, x in inputs.items()}
    cu_seqlens = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    upstream = {"o": rand(1, T, H, V).double(), "final_state": rand(N, H, K, V).double()}
    return inputs, cu_seqlens, upstream


def _run(inputs: dict, cu_seqlens, upstream: dict, impl: str, as_float64: bool) -> dict:
    from memmix.ops import gated_delta_rule

    leaves = {n: (x.double() if as_float64 else x).detach().requires_grad_(True) for n, x in inputs.items()}
    o, final = gated_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"],
                                initial_state=leaves["initial_state"], output_final_state=True, cu_seqlens=cu_seqlens,
                                impl=impl)
    loss = (o.double() * upstream["o"]).sum() + (final.double() * upstream["final_state"]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "final_state": final, **{"d" + n: grad for n, grad in zip(leaves, grads)}}


@pytest.mark.parametrize("pairs", list(PAIRS))
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("v_ratio", [1, 2], ids=["V=K", "V=2K"])
@pytest.mark.parametrize("K", HEAD_DIMS)
def test_kernel_sweep_matches_float64(K, v_ratio, dtype, form, pairs):
    from memmix.ops.triton import MAX_HEAD_DIM, RECURRENT_KERNEL_MAX_K

    V = K * v_ratio
    if form == "recurrent" and K > RECURRENT_KERNEL_MAX_K:
        pytest.skip("the recurrent kernels take q/k heads of at most 128")
    if form == "chunked" and V > MAX_HEAD_DIM:
        pytest.skip("the chunked kernels take v heads of at most 256")
    seed = K * 1000 + v_ratio * 100 + pairs % 97 + (dtype == torch.float32)
    inputs, cu_seqlens, upstream = _case(K, V, pairs, dtype, seed)
    expected = _run(inputs, cu_seqlens, upstream, "chunk", as_float64=True)
    with forced_sequence_form(form):
        actual = _run(inputs, cu_seqlens, upstream, "triton", as_float64=False)
    errors = {key: rel_err(actual[key], expected[key]) for key in expected}
    bad = {key: f"{err:.1e}" for key, err in errors.items() if not err <= TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]}: {bad}"
