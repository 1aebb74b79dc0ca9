"""The Triton kernels run by Triton's CPU interpreter, checked against the float64 step loop.

TRITON_INTERPRET=1 must be set before triton is imported, so the kernels run in a child process: this
file, run as a script, computes every case and prints one JSON object of relative errors (output, final
state and every gradient); the tests below start it once and check each case's errors.
"""
from __future__ import annotations

import pytest
import torch

from helpers import count_recurrence_passes, forced_sequence_form, print_case_results, rel_err

# name -> shapes and options; lengths: a packed varlen batch (B = 1); "public": call the public op with impl="triton"
# (through the registry), else the kernel entry itself.
CASES = {
    "dense_T1": dict(B=2, T=1, H=2, K=16, V=16),
    "dense_T63": dict(B=2, T=63, H=2, K=32, V=32),
    "dense_T65_no_initial_state": dict(B=1, T=65, H=2, K=32, V=16, initial_state=False),
    "dense_T130": dict(B=1, T=130, H=1, K=16, V=16),
    "varlen_empty_and_length1": dict(lengths=[5, 0, 1, 70, 64], H=2, K=16, V=16),
    "delta_rule_varlen_small_dims": dict(lengths=[0, 1, 130], H=2, K=8, V=40, gated=False, public=True),
    "l2norm_scale_no_final_state": dict(B=2, T=40, H=2, K=16, V=16, use_qk_l2norm=True, scale=0.3,
                                        output_final_state=False, public=True),
    "float16": dict(B=1, T=65, H=2, K=32, V=32, dtype="float16"),
    # log decay ~ -2 per token: a partial last chunk (50 and 70 = 64 + 6 rows) decays past exp(-88), where
    # exp(b_pad - b_t) of a padded row overflows float32 unless padded rows repeat the last valid b
    "strong_decay_partial_chunks": dict(lengths=[50, 70], H=2, K=16, V=16, log_decay=(1.8, 2.2)),
    # the backward one head per pass (a LaunchPolicy of 0 backward programs), as on a GPU with many segments; and two
    # per pass
    "backward_one_head_per_pass": dict(lengths=[5, 70, 0, 64], H=4, K=16, V=16, min_backward_programs=0),
    "backward_two_heads_per_pass": dict(B=2, T=65, H=4, K=16, V=32, min_backward_programs=2 * 2 * 1,
                                        initial_state=False),
    # low_memory=True: forward and backward one head at a time (through the public op, so the argument reaches the
    # kernel), and the same on the kernel entry
    "low_memory_one_head_at_a_time": dict(lengths=[5, 130, 0, 64], H=3, K=16, V=16, low_memory=True, public=True),
    "low_memory_kernel_entry": dict(B=2, T=70, H=2, K=16, V=16, low_memory=True, gated=False),
}
# the same cases on the fused recurrent kernels (the form memmix.ops.triton picks for narrow heads); the cases above
# run the chunked form (forced for the public ones)
RECURRENT_CASES = ("dense_T1", "dense_T63", "dense_T65_no_initial_state", "varlen_empty_and_length1",
                   "delta_rule_varlen_small_dims", "l2norm_scale_no_final_state", "float16",
                   "strong_decay_partial_chunks")
CASES.update({f"recurrent_{name}": dict(CASES[name], form="recurrent") for name in RECURRENT_CASES})
# bf16 is left to the GPU tests: the interpreter's tl.dot mishandles bfloat16 operands (Triton 3.9).
TOLERANCE = {"float32": 1e-5, "float16": 5e-3}


def _inputs(case: dict, seed: int) -> dict:
    """Random float64 inputs for one case (keys q, k, v, g, beta, initial_state, cu_seqlens)."""
    gen = torch.Generator().manual_seed(seed)
    H, K, V = case["H"], case["K"], case["V"]
    lengths = case.get("lengths")
    B, T = (1, sum(lengths)) if lengths else (case["B"], case["T"])
    num_seqs = len(lengths) if lengths else B
    lo, hi = case.get("log_decay", (0.01, 1.0))  # -g drawn uniformly from [lo, hi]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {"q": rand(B, T, H, K), "k": rand(B, T, H, K) * K ** -0.5, "v": rand(B, T, H, V),
              "g": -(lo + (hi - lo) * torch.rand(B, T, H, generator=gen, dtype=torch.float64)),
              "beta": torch.rand(B, T, H, generator=gen, dtype=torch.float64),
              "initial_state": rand(num_seqs, H, K, V)}
    if not case.get("gated", True):
        inputs["g"] = None
    if not case.get("initial_state", True):
        inputs["initial_state"] = None
    inputs["cu_seqlens"] = torch.tensor([0] + lengths).cumsum(0) if lengths else None
    return inputs


def _run(fn, inputs: dict, case: dict, upstream: dict) -> dict:
    """Call a rule implementation; return {"o", "final_state", "d<name>"...} in float64."""
    names = [n for n in ("q", "k", "v", "g", "beta", "initial_state") if inputs[n] is not None]
    kwargs = dict(scale=case.get("scale"), initial_state=inputs["initial_state"], cu_seqlens=inputs["cu_seqlens"],
                  output_final_state=case.get("output_final_state", True),
                  use_qk_l2norm=case.get("use_qk_l2norm", False), low_memory=case.get("low_memory", False))
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta") if inputs[n] is not None]
    o, final_state = fn(*args, **kwargs)
    loss = (o.double() * upstream["o"]).sum()
    if final_state is not None:
        loss = loss + (final_state.double() * upstream["final_state"]).sum()
    grads = torch.autograd.grad(loss, [inputs[n] for n in names])
    out = {"o": o.double(), "final_state": final_state}
    out.update({"d" + n: grad.double() for n, grad in zip(names, grads)})
    return out


def _rel_err(actual, expected) -> float:
    return 0.0 if actual is None and expected is None else rel_err(actual, expected)


def run_case(name: str, seed: int) -> dict:
    """Relative errors of the Triton kernel vs the float64 step loop for CASES[name], and "passes": how many head
    groups its forward and backward took."""
    from memmix.ops import delta_rule, gated_delta_rule
    from memmix.ops.triton import gated_delta_rule as kernels
    from memmix.ops.triton.recurrent_delta_rule import recurrent_gated_delta_rule

    case = CASES[name]
    form = case.get("form", "chunked")  # the kernel entry called, and the form the public op takes
    chunk_gated_delta_rule = recurrent_gated_delta_rule if form == "recurrent" else kernels.chunk_gated_delta_rule
    gated = case.get("gated", True)
    dtype = getattr(torch, case.get("dtype", "float32"))
    reference_inputs = _inputs(case, seed)
    kernel_inputs = {n: (x if x is None or n == "cu_seqlens" else x.to(dtype)) for n, x in reference_inputs.items()}
    for inputs in (reference_inputs, kernel_inputs):
        for n, x in inputs.items():
            if x is not None and n != "cu_seqlens":
                x.requires_grad_(True)

    rule = gated_delta_rule if gated else delta_rule

    def reference(*args, **kwargs):
        return rule(*args, impl="recurrent", **kwargs)

    if case.get("public"):
        def kernel(*args, **kwargs):
            return rule(*args, impl="triton", **kwargs)
    else:
        policy = {} if form == "recurrent" else dict(policy=kernels.LaunchPolicy(
            min_backward_programs=case.get("min_backward_programs")))

        def kernel(*args, **kwargs):
            q, k, v, *gates = args
            return chunk_gated_delta_rule(q, k, v, *(gates if gated else [None] + gates), **kwargs, **policy)

    v = reference_inputs["v"]
    num_seqs = v.shape[0] if reference_inputs["cu_seqlens"] is None else len(reference_inputs["cu_seqlens"]) - 1
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = {"o": torch.randn(v.shape, generator=gen, dtype=torch.float64),
                "final_state": torch.randn(num_seqs, case["H"], case["K"], case["V"], generator=gen,
                                           dtype=torch.float64)}
    expected = _run(reference, reference_inputs, case, upstream)
    with count_recurrence_passes() as passes, forced_sequence_form(form):
        actual = _run(kernel, kernel_inputs, case, upstream)
    return {"errors": {key: _rel_err(actual[key], expected[key]) for key in expected}, "passes": passes}


INTERPRET_TIMEOUT = 300  # seconds for the child process


def _main() -> None:
    print_case_results(run_case, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_step_loop_under_interpreter(interpret_results, name):
    errors = interpret_results[name]["errors"]
    case = CASES[name]
    expected_keys = {"o", "final_state", "dq", "dk", "dv", "dbeta"}
    expected_keys |= {"dg"} if case.get("gated", True) else set()
    expected_keys |= {"dinitial_state"} if case.get("initial_state", True) else set()
    assert set(errors) == expected_keys
    tolerance = TOLERANCE[case.get("dtype", "float32")]
    bad = {key: err for key, err in errors.items() if not err <= tolerance}
    assert not bad, f"relative errors above {tolerance}: {bad}"


def test_low_memory_runs_one_head_at_a_time_forward_and_backward(interpret_results):
    for name in ("low_memory_one_head_at_a_time", "low_memory_kernel_entry"):
        heads = CASES[name]["H"]
        assert interpret_results[name]["passes"] == {"forward": heads, "backward": heads}, name
    # by default all heads at once under the interpreter (inputs longer than a chunk compute the output in one
    # parallel pass after the state pass)
    assert interpret_results["varlen_empty_and_length1"]["passes"] == {"forward": 1, "backward": 1}


def test_backward_heads_per_pass_is_the_fewest_that_fill_the_gpu():
    pytest.importorskip("triton")
    from memmix.ops.triton import gated_delta_rule as kernels

    def heads(num_seqs, H, K, V, dtype=torch.bfloat16, min_programs=264):  # two per SM of a 132-SM GPU
        return kernels.heads_per_backward_pass(num_seqs, H, K, V, dtype, min_programs)

    # K = V = 256: 4 V tiles of 64. MoM at 8 x 2048 packs 41 segments (164 programs a head): two heads a pass
    assert heads(41, 4, 256, 256) == 2
    assert heads(81, 4, 256, 256) == 1  # 16 x 2048: 324 programs a head
    assert heads(9, 4, 256, 256) == 4  # 8 sequences: 36 programs a head
    assert heads(41, 3, 256, 256) == 3  # 2 does not divide 3
    # float32 takes V tiles of 32: twice the programs a head, so one head a pass already fills the GPU
    assert heads(41, 4, 256, 256, torch.float32) == 1
    # the interpreter cases above that force a split really split
    assert heads(2, 4, 16, 32, min_programs=CASES["backward_two_heads_per_pass"]["min_backward_programs"]) == 2
    assert heads(4, 4, 16, 16, min_programs=0) == 1
    assert heads(4, 4, 16, 16, min_programs=None) == 4  # no GPU to fill: every head in one pass
    # the policy a device gets: none off the GPU; on one, two backward programs per SM
    assert kernels.LaunchPolicy.for_device(torch.device("cpu")) == kernels.LaunchPolicy(None, None)


def test_sequential_v_tiles_narrow_until_most_sms_have_a_program():
    pytest.importorskip("triton")
    from memmix.ops.triton import gated_delta_rule as kernels

    def tile(programs, dtype=torch.bfloat16, V=256, device="cuda"):
        sms = 132 if device == "cuda" else None  # a 132-SM GPU; no SM count off the GPU
        return kernels._state_config(256, V, dtype, programs, sms)["BV"]

    assert tile(42 * 2) == 64  # MoM at 8 x 2048, two heads a pass: 84 x 4 tiles of 64 fill 132 SMs
    assert tile(8 * 4) == 64  # a dense batch of 8 x 4 heads: 128 programs, over 3/4 of the SMs
    assert tile(6 * 4) == 32  # MoM at 1 x 32768 (6 segments), four heads: 96 programs at 64, 192 at 32
    assert tile(6) == 32  # the same one head a pass (low_memory): the narrowest tile (kernels.MIN_TILE)
    assert tile(None) == 64 and tile(6, device="cpu") == 64  # no launch size, or no GPU: the widest
    assert tile(6, dtype=torch.float32) == 32  # float32 keeps its tile
    assert tile(200, V=32) == 32 and tile(1, V=32) == 32  # never wider than V, never narrower than MIN_TILE
    assert kernels._chunk_config(16, 16) == dict(kernels._chunk_config(32, 32))  # K = V = 16 take 32-wide tiles


def test_chunk_layouts_are_reused_until_cu_seqlens_change():
    pytest.importorskip("triton")
    from memmix.ops.triton.gated_delta_rule import ChunkLayout

    cu = torch.tensor([0, 5, 70, 70, 200])  # CPU bounds are keyed by their values
    first = ChunkLayout.build(1, 200, cu, "cpu")
    assert ChunkLayout.build(1, 200, cu, "cpu") is first and ChunkLayout.build(1, 200, cu.clone(), "cpu") is first
    assert ChunkLayout.build(1, 201, cu, "cpu") is not first
    assert first.chunk_offsets.tolist() == [0, 1, 3, 3, 6]
    cu.numpy()[2] = 64  # a write autograd's version counter does not see (lengths 5, 59, 6, 130)
    second = ChunkLayout.build(1, 200, cu, "cpu")
    assert second is not first and second.chunk_offsets.tolist() == [0, 1, 2, 3, 6]
    assert first.cu_seqlens.tolist() == [0, 5, 70, 70, 200]  # a layout owns a copy of its bounds
    dense = ChunkLayout.build(3, 130, None, "cpu")
    assert ChunkLayout.build(3, 130, None, "cpu") is dense and ChunkLayout.build(3, 129, None, "cpu") is not dense
    assert dense.chunk_start.tolist() == [0, 64, 128, 130, 194, 258, 260, 324, 388]


def test_head_dim_above_256_is_rejected():
    pytest.importorskip("triton")
    from memmix.ops.triton import chunk_gated_delta_rule

    q = torch.zeros(1, 4, 1, 272)
    v = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="<= 256"):
        chunk_gated_delta_rule(q, q, v, None, torch.zeros(1, 4, 1))


if __name__ == "__main__":
    _main()
