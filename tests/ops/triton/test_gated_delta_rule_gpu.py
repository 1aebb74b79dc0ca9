"""Triton kernels at real sizes on CUDA vs the float64 reference (memmix.ops chunk form, checked against
the step loop by its own tests): outputs, final states and every gradient, bf16 and fp32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import forced_sequence_form, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-3}
# name -> shapes and options; lengths: a packed varlen batch (B = 1)
CASES = {
    "dense_odd_T": dict(B=2, T=300, H=3, K=128, V=128),
    "dense_K256_V256": dict(B=1, T=257, H=2, K=256, V=256),  # few programs: the narrowest V tiles (MIN_TILE)
    # the widest V tiles (64), as with many sequences: the chunked launches are sized for a GPU of 1 SM
    "dense_K256_V256_wide_v_tiles": dict(B=1, T=257, H=2, K=256, V=256, policy=dict(sms=1)),
    "dense_uneven_dims": dict(B=2, T=129, H=2, K=100, V=72, initial_state=False),
    "varlen_empty_len1": dict(lengths=[0, 1, 200, 63, 64, 129, 0, 500], H=2, K=64, V=128),
    "delta_rule_varlen": dict(lengths=[1, 0, 190, 77], H=2, K=128, V=64, gated=False),
    "l2norm_scale": dict(B=2, T=150, H=2, K=64, V=64, use_qk_l2norm=True, scale=0.2),
    # -g ~ 2 per token: partial last chunks decay past exp(-88) (padded rows once overflowed to NaN gradients)
    "strong_decay_partial_chunks": dict(lengths=[50, 70, 1271], H=2, K=64, V=64, log_decay=(1.8, 2.2)),
    # the backward one head per pass, as for MoM's many segments (a policy of 0 backward programs forces it here)
    "backward_one_head_per_pass": dict(lengths=[300, 0, 1, 64, 700, 129], H=3, K=256, V=256,
                                       policy=dict(min_backward_programs=0)),
    # low_memory=True: forward and backward one head at a time
    "low_memory_one_head_at_a_time": dict(lengths=[300, 0, 1, 64, 700, 129], H=3, K=256, V=256, low_memory=True),
}


def _inputs(case: dict, dtype: torch.dtype, seed: int) -> dict:
    """Random inputs in `dtype` on CUDA: unit-norm k (as after l2norm), -g uniform in case["log_decay"]
    (default [0.01, 1]), beta in (0, 1)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    H, K, V = case["H"], case["K"], case["V"]
    lengths = case.get("lengths")
    B, T = (1, sum(lengths)) if lengths else (case["B"], case["T"])
    num_seqs = len(lengths) if lengths else B
    lo, hi = case.get("log_decay", (0.01, 1.0))

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)

    inputs = {"q": rand(B, T, H, K), "k": F.normalize(rand(B, T, H, K), dim=-1), "v": rand(B, T, H, V),
              "g": -(lo + (hi - lo) * torch.rand(B, T, H, generator=gen, device="cuda")),
              "beta": torch.rand(B, T, H, generator=gen, device="cuda"),
              "initial_state": rand(num_seqs, H, K, V)}
    if not case.get("gated", True):
        inputs["g"] = None
    if not case.get("initial_state", True):
        inputs["initial_state"] = None
    inputs = {n: None if x is None else (x if n == "initial_state" else x.to(dtype)) for n, x in inputs.items()}
    inputs["cu_seqlens"] = (torch.tensor([0] + lengths, device="cuda").cumsum(0) if lengths else None)
    return inputs


def _outputs_and_grads(impl: str, inputs: dict, case: dict, upstream: dict, as_float64: bool,
                       low_memory: bool = False, policy=None) -> dict:
    """Run memmix.ops with `impl` (with a LaunchPolicy: the chunked kernel entry); return o, final_state and
    d<input> for every differentiable input."""
    from memmix.ops import delta_rule, gated_delta_rule
    from memmix.ops.triton.gated_delta_rule import chunk_gated_delta_rule

    names = [n for n in ("q", "k", "v", "g", "beta", "initial_state") if inputs[n] is not None]
    leaves = {n: (inputs[n].double() if as_float64 else inputs[n]).detach().requires_grad_(True) for n in names}
    gated = case.get("gated", True)
    args = [leaves["q"], leaves["k"], leaves["v"]] + ([leaves["g"]] if gated else []) + [leaves["beta"]]
    kwargs = dict(scale=case.get("scale"), initial_state=leaves.get("initial_state"), output_final_state=True,
                  cu_seqlens=inputs["cu_seqlens"], use_qk_l2norm=case.get("use_qk_l2norm", False),
                  low_memory=low_memory)
    if policy is not None:
        o, final_state = chunk_gated_delta_rule(*(args if gated else args[:3] + [None] + args[3:]), **kwargs,
                                                policy=policy)
    else:
        o, final_state = (gated_delta_rule if gated else delta_rule)(*args, **kwargs, impl=impl)
    loss = (o.double() * upstream["o"]).sum() + (final_state.double() * upstream["final_state"]).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    out = {"o": o, "final_state": final_state}
    out.update({"d" + n: grad for n, grad in zip(names, grads)})
    return out


FORMS = ("chunked", "recurrent")  # the sequence form, forced


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float64_reference(name, dtype, form):
    from memmix.ops.triton import RECURRENT_KERNEL_MAX_K
    from memmix.ops.triton.gated_delta_rule import LaunchPolicy

    case = CASES[name]
    if form == "recurrent" and case["K"] > RECURRENT_KERNEL_MAX_K:
        pytest.skip("the recurrent kernels take q/k heads of at most 128")
    policy = None  # a case's launch sizing, given to the chunked kernels (the recurrent form has none to tune)
    if case.get("policy") and form == "chunked":
        default = LaunchPolicy.for_device(torch.device("cuda"))
        policy = LaunchPolicy(**{**vars(default), **case["policy"]})
    seed = list(CASES).index(name) * 10 + (dtype == torch.float32)
    inputs = _inputs(case, dtype, seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1000)
    v, h0_shape = inputs["v"], (inputs["v"].shape[0] if inputs["cu_seqlens"] is None
                                else inputs["cu_seqlens"].numel() - 1, case["H"], case["K"], case["V"])
    upstream = {"o": torch.randn(v.shape, generator=gen, device="cuda", dtype=torch.float64),
                "final_state": torch.randn(h0_shape, generator=gen, device="cuda", dtype=torch.float64)}
    expected = _outputs_and_grads("chunk", inputs, case, upstream, as_float64=True)
    with forced_sequence_form(form):
        actual = _outputs_and_grads("triton", inputs, case, upstream, as_float64=False,
                                    low_memory=case.get("low_memory", False), policy=policy)
    assert actual["o"].dtype == dtype and actual["final_state"].dtype == torch.float32
    errors = {key: rel_err(actual[key], expected[key]) for key in expected}
    print(name, dtype, " ".join(f"{key}={err:.1e}" for key, err in errors.items()))
    bad = {key: err for key, err in errors.items() if not err <= TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]}: {bad}"


def test_chunk_reference_agrees_with_step_loop_on_gpu():
    """The float64 chunk reference used above matches the step loop on one varlen case."""
    from memmix.ops import gated_delta_rule

    inputs = _inputs(dict(lengths=[3, 0, 130, 1], H=2, K=32, V=48), torch.float64, seed=7)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    kwargs = dict(initial_state=inputs["initial_state"].double(), output_final_state=True,
                  cu_seqlens=inputs["cu_seqlens"])
    o_chunk, s_chunk = gated_delta_rule(*args, impl="chunk", **kwargs)
    o_loop, s_loop = gated_delta_rule(*args, impl="recurrent", **kwargs)
    assert rel_err(o_chunk, o_loop) < 1e-10 and rel_err(s_chunk, s_loop) < 1e-10


def test_auto_picks_triton_on_cuda_and_no_host_sync():
    """impl="auto" runs the kernels on CUDA; the kernel entry (forward and backward) never syncs the host."""
    from memmix.ops import gated_delta_rule
    from memmix.ops.common import resolve_impl
    from memmix.ops.registry import get_rule
    from memmix.ops.triton import chunk_gated_delta_rule, is_available

    def q(K, dtype=torch.bfloat16):
        return torch.zeros(1, 100, 2, K, device="cuda", dtype=dtype)

    assert is_available() and resolve_impl("auto", get_rule("gated_delta_rule"), q(64)) == "triton"
    # the kernels' limits send auto to the PyTorch path: heads wider than 256, float64, a rule without a kernel
    assert resolve_impl("auto", get_rule("gated_delta_rule"), q(272)) == "chunk"
    assert resolve_impl("auto", get_rule("gated_delta_rule"), q(64), q(272)) == "chunk"
    assert resolve_impl("auto", get_rule("gated_delta_rule"), q(64, torch.float64)) == "chunk"
    assert resolve_impl("auto", get_rule("gated_linear_attention"), q(64)) == "chunk"
    inputs = _inputs(dict(lengths=[5, 0, 70, 1], H=2, K=64, V=64), torch.bfloat16, seed=3)
    for n in ("q", "k", "v", "g", "beta"):
        inputs[n].requires_grad_(True)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    o_auto, _ = gated_delta_rule(*args, cu_seqlens=inputs["cu_seqlens"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, final_state = chunk_gated_delta_rule(*args, initial_state=inputs["initial_state"], output_final_state=True,
                                                cu_seqlens=inputs["cu_seqlens"])
        (o.float().sum() + final_state.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    o_plain, _ = chunk_gated_delta_rule(*args, cu_seqlens=inputs["cu_seqlens"])
    assert torch.equal(o_auto, o_plain)
    assert all(inputs[n].grad is not None and torch.isfinite(inputs[n].grad.float()).all() for n in ("q", "k", "v"))
