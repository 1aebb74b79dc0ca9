"""MoM decoding steps with the states stepped by the Triton recurrent_step kernel (impl "auto", no gradient, Triton's
CPU interpreter) against the differentiable gather / step / scatter and the PyTorch memory_step: outputs and states;
a functional step leaves the given state alone, an in-place one writes it and returns it.

TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in a child process (this file as a
script prints one JSON object) and the tests check them.
"""
from __future__ import annotations

import pytest
import torch

from helpers import print_case_results, rel_err

SIZES = dict(D=24, H=2, K=12, V=12, M=4)
CASES = {
    "gated_delta": dict(rule="gated_delta"),
    "delta": dict(rule="delta"),
    "gla_expand_v2": dict(rule="gla", V=24),
    "linear_k1_no_shared": dict(rule="linear", k=1, shared=False),
}
STEPS = 3
B = 3
TOLERANCE = 1e-5


def _inputs(case: dict, seed: int) -> dict:
    """float32 weights, a random state for B sequences, STEPS tokens, and masks (row 1 padded at step 1)."""
    from mom_helpers import make_routing, make_state, make_weights

    options = {**SIZES, **{key: value for key, value in case.items() if key not in ("rule", "k")}}
    weights = make_weights(case["rule"], **options, dtype=torch.float32, seed=seed)
    ids, routing = make_routing(B, STEPS, options["M"], case.get("k", 2), dtype=torch.float32, seed=seed + 1)
    shared = options.get("shared", True)
    memory, conv = make_state(B, weights, SIZES["H"], options["M"], shared, dtype=torch.float32, seed=seed + 2)
    valid = torch.ones(B, STEPS, dtype=torch.bool)
    valid[1, 1] = False
    gen = torch.Generator().manual_seed(seed + 3)
    return dict(x=torch.randn(B, STEPS, SIZES["D"], generator=gen), ids=ids, routing=routing, weights=weights,
                memory=memory, conv=conv, valid=valid,
                kwargs=dict(rule=case["rule"], num_heads=SIZES["H"], num_memories=options["M"], shared_memory=shared))


def _decode(inputs: dict, *, impl: str, grad: bool, inplace: bool = False) -> dict:
    """STEPS decoding steps from a copy of the state: outputs, the final state, whether every step left its input
    state unchanged (functional) or returned it written in place, and whether padded rows kept their states."""
    from memmix.ops.mom import mom_mixer

    memory, conv = inputs["memory"].clone(), inputs["conv"].clone()
    if grad:
        memory.requires_grad_(True)
    outputs, kept_input, padded_kept = [], True, True
    with torch.set_grad_enabled(grad):
        for t in range(STEPS):
            before = (memory.detach().clone(), conv.clone())
            step = slice(t, t + 1)
            out = mom_mixer(inputs["x"][:, step], inputs["ids"][:, step], inputs["routing"][:, step],
                            inputs["weights"], **inputs["kwargs"], memory=memory, conv=conv,
                            valid=inputs["valid"][:, step], use_cache=True, inplace=inplace, impl=impl)
            if inplace:
                kept_input &= out.memory is memory and out.conv is conv
            else:
                kept_input &= torch.equal(memory.detach(), before[0]) and torch.equal(conv, before[1])
            padded = ~inputs["valid"][:, t]
            padded_kept &= torch.equal(out.memory.detach()[padded], before[0][padded])
            outputs.append(out.o.detach())
            memory, conv = out.memory, out.conv
    return {"o": torch.cat(outputs, 1), "memory": memory.detach(), "conv": conv.detach(),
            "kept_input": kept_input, "padded_kept": padded_kept}


def run_case(name: str, seed: int) -> dict:
    import memmix.ops.decode as decode

    calls = []
    triton_step = decode._triton_step
    decode._triton_step = lambda *args: calls.append(1) or triton_step(*args)

    inputs = _inputs(CASES[name], seed)
    expected = _decode(inputs, impl="auto", grad=True)  # the differentiable gather / step / scatter
    pytorch = _decode(inputs, impl="chunk", grad=False)  # memory_step, PyTorch
    before = len(calls)
    kernel = _decode(inputs, impl="auto", grad=False)  # memory_step, Triton
    kernel_calls = len(calls) - before
    inplace = _decode(inputs, impl="auto", grad=False, inplace=True)
    result = {"kernel_calls": kernel_calls, "pytorch_calls_kernel": before > 0}
    for path, got in (("pytorch", pytorch), ("kernel", kernel), ("inplace", inplace)):
        result.update({f"{path}_{key}": rel_err(got[key], expected[key]) for key in ("o", "memory", "conv")})
        result[f"{path}_kept_input"] = got["kept_input"]
        result[f"{path}_padded_kept"] = got["padded_kept"]
    return result


INTERPRET_TIMEOUT = 300  # seconds for the child process


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_decode_matches_pytorch_decode(interpret_results, name):
    result = interpret_results[name]
    assert result["kernel_calls"] == STEPS and not result["pytorch_calls_kernel"]
    assert result["pytorch_kept_input"] and result["kernel_kept_input"], "a functional step wrote its input"
    assert result["inplace_kept_input"], "an in-place step must return the state it was given"
    assert all(result[f"{path}_padded_kept"] for path in ("pytorch", "kernel", "inplace")), "a pad moved a state"
    errors = {key: value for key, value in result.items() if key.endswith(("_o", "_memory", "_conv"))}
    bad = {key: err for key, err in errors.items() if not err <= TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


if __name__ == "__main__":
    print_case_results(run_case, CASES)
