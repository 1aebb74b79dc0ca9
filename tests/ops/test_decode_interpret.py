"""The Triton recurrent_step kernel (memory_step impl="triton") run by Triton's CPU interpreter, against
memory_step's PyTorch path (float32) and the float64 per-(slot, head) loop.

TRITON_INTERPRET=1 must be set before triton is imported, so this file, run as a script, computes every case
in a child process and prints one JSON object; the tests below check each case.
"""
from __future__ import annotations

import pytest
import torch

from helpers import print_case_results, rel_err

# name -> memory_step arguments: N = B * S picked slots of a bank of `slots` rows (odd K and V need masks)
CASES = {
    "gated_delta_rule": dict(rule="gated_delta_rule", N=6, H=2, K=24, V=40, slots=10),
    "delta_rule": dict(rule="delta_rule", N=6, H=2, K=24, V=40, slots=10),
    "gated_linear_attention": dict(rule="gated_linear_attention", N=6, H=2, K=24, V=40, slots=10),
    "linear_attention": dict(rule="linear_attention", N=6, H=2, K=24, V=40, slots=10),
    "K256_two_V_tiles": dict(rule="gated_delta_rule", N=3, H=1, K=256, V=40, slots=4),
    "float16_inputs": dict(rule="delta_rule", N=4, H=2, K=16, V=16, slots=8, dtype="float16"),
    # a bank view with padded rows and columns (non-contiguous), int32 index, explicit scale
    "strided_bank_int32_index": dict(rule="gated_delta_rule", N=4, H=2, K=12, V=20, slots=6, strided=True,
                                     scale=0.3),
}
TOLERANCE = {"float32": 1e-5, "float16": 5e-3}


def run_case(name: str, seed: int) -> dict:
    """Relative errors of the kernel vs the PyTorch path and vs the float64 loop; untouched rows identical?"""
    from ops_helpers import make_step_inputs, naive_memory_step
    from memmix.ops import memory_step

    case = CASES[name]
    rule, dtype = case["rule"], getattr(torch, case.get("dtype", "float32"))
    inputs = make_step_inputs(rule, N=case["N"], H=case["H"], K=case["K"], V=case["V"], slots=case["slots"],
                              dtype=dtype, bank_dtype=torch.float32, seed=seed)
    wide = inputs["bank"]  # the storage the bank lives in
    if case.get("strided"):
        wide = torch.randn(case["slots"], case["H"], case["K"] + 3, case["V"] + 5)
        wide[:, :, : case["K"], : case["V"]] = inputs["bank"]
        inputs["bank"] = wide[:, :, : case["K"], : case["V"]]
        inputs["index"] = inputs["index"].int()
    outside = torch.ones(wide.shape, dtype=torch.bool)
    outside[:, :, : case["K"], : case["V"]] = False
    wide_before = wide.clone()
    names = ("q", "k", "v", "g", "beta", "bank", "index", "keep")
    original = inputs["bank"].clone()
    expected_o, expected_bank = naive_memory_step(rule, *(inputs[n] for n in names), scale=case.get("scale"))
    reference_bank = original.clone()
    reference_o = memory_step(rule, *(reference_bank if n == "bank" else inputs[n] for n in names),
                              scale=case.get("scale"), impl="recurrent")
    o = memory_step(rule, *(inputs[n] for n in names), scale=case.get("scale"), impl="triton")
    bank = inputs["bank"]

    written = torch.zeros(case["slots"], dtype=torch.bool)
    written[inputs["index"].long()[inputs["keep"]]] = True
    return {"o_vs_recurrent": rel_err(o, reference_o), "bank_vs_recurrent": rel_err(bank, reference_bank),
            "o_vs_float64": rel_err(o, expected_o), "bank_vs_float64": rel_err(bank, expected_bank),
            "o_dtype": str(o.dtype).removeprefix("torch."),
            "untouched_identical": torch.equal(bank[~written], original[~written]),
            "outside_identical": torch.equal(wide[outside], wide_before[outside]),
            "written_changed": not torch.equal(bank[written], original[written])}


INTERPRET_TIMEOUT = 300  # seconds for the child process


def _main() -> None:
    print_case_results(run_case, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_pytorch_step_under_interpreter(interpret_results, name):
    result = interpret_results[name]
    dtype = CASES[name].get("dtype", "float32")
    assert result["o_dtype"] == dtype
    assert result["untouched_identical"] and result["outside_identical"] and result["written_changed"]
    errors = {key: value for key, value in result.items() if key.startswith(("o_vs", "bank_vs"))}
    bad = {key: err for key, err in errors.items() if not err <= TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]}: {bad}"


if __name__ == "__main__":
    _main()
