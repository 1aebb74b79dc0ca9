"""MoM decode steps on the Triton recurrent_step kernel (impl auto, no gradient, Triton's CPU interpreter) against
the differentiable gather / step / scatter path and the PyTorch memory_step: outputs and states; the functional
step leaves the given state alone, the in-place one writes it.

TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in a child process (this file as a
script prints one JSON object) and the tests check them.
"""
from __future__ import annotations

import pytest
import torch

from helpers import print_case_results, rel_err

BASE = dict(hidden_size=24, num_heads=2, head_dim=12, num_memories=4, topk=2, shared_mem=True)
CASES = {
    "gated_delta": dict(memory_rule="gated_delta"),
    "delta": dict(memory_rule="delta"),
    "gla_expand_v2": dict(memory_rule="gla", expand_v=2.0),
    "linear_k1_no_shared": dict(memory_rule="linear", topk=1, shared_mem=False),
}
STEPS = 3
TOLERANCE = 1e-5


def _layer_and_inputs(options: dict, seed: int):
    """A float32 layer, a random state for B = 3 sequences, STEPS tokens and masks (row 1 padded at step 1)."""
    from memmix.layers import MixtureOfMemories

    torch.manual_seed(seed)
    layer = MixtureOfMemories(**{**BASE, **options})
    with torch.no_grad():
        layer.gate.weight.mul_(20)  # a sharp router, so that rows pick different memories
    state = layer.init_state(3)
    state.memory.normal_()
    state.conv.normal_()
    x = torch.randn(3, STEPS, BASE["hidden_size"])
    masks = [torch.ones(3, 1, dtype=torch.long) for _ in range(STEPS)]
    masks[1][1] = 0
    return layer, state, x, masks


def _decode(layer, state, x, masks, *, impl: str, grad: bool, inplace: bool = False) -> dict:
    """STEPS decode steps from a copy of state: outputs, the final state, whether each step left its input state
    unchanged (functional) or returned it written in place, and whether padded rows kept their states."""
    from memmix.layers.mom import MoMState

    layer.impl, layer.inplace_decode = impl, inplace
    state = MoMState(state.memory.clone(), state.conv.clone(), state.num_routed)
    outputs, kept_input, padded_kept = [], True, True
    with torch.set_grad_enabled(grad):
        for t in range(STEPS):
            before = (state.memory.clone(), state.conv.clone())
            result = layer(x[:, t : t + 1], attention_mask=masks[t], state=state, use_cache=True)
            if inplace:
                kept_input &= result.state is state
            else:
                kept_input &= torch.equal(state.memory, before[0]) and torch.equal(state.conv, before[1])
            padded = masks[t][:, 0] == 0
            padded_kept &= torch.equal(result.state.memory[padded], before[0][padded])
            outputs.append(result.hidden_states.detach())
            state = result.state
    return {"output": torch.cat(outputs, 1), "memory": state.memory.detach(), "conv": state.conv.detach(),
            "kept_input": kept_input, "padded_kept": padded_kept}


def run_case(name: str, seed: int) -> dict:
    import memmix.ops.decode as decode

    calls = []
    triton_step = decode._triton_step
    decode._triton_step = lambda *args: calls.append(1) or triton_step(*args)

    layer, state, x, masks = _layer_and_inputs(CASES[name], seed)
    # the differentiable path; with gradients on, the projections' CPU kernels round differently (~1e-7)
    expected = _decode(layer, state, x, masks, impl="auto", grad=True)
    pytorch = _decode(layer, state, x, masks, impl="chunk", grad=False)  # memory_step, PyTorch
    before = len(calls)
    kernel = _decode(layer, state, x, masks, impl="auto", grad=False)  # memory_step, Triton
    kernel_calls = len(calls) - before
    inplace = _decode(layer, state, x, masks, impl="auto", grad=False, inplace=True)
    result = {"kernel_calls": kernel_calls, "pytorch_calls_kernel": before > 0}
    for path, got in (("pytorch", pytorch), ("kernel", kernel), ("inplace", inplace)):
        result.update({f"{path}_{key}": rel_err(got[key], expected[key]) for key in ("output", "memory", "conv")})
        result[f"{path}_kept_input"] = got["kept_input"]
        result[f"{path}_padded_kept"] = got["padded_kept"]
    return result


INTERPRET_TIMEOUT = 300  # seconds for the child process


def _main() -> None:
    print_case_results(run_case, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_decode_matches_pytorch_decode(interpret_results, name):
    result = interpret_results[name]
    assert result["kernel_calls"] == STEPS and not result["pytorch_calls_kernel"]
    assert result["pytorch_kept_input"] and result["kernel_kept_input"], "a functional step wrote its input"
    assert result["inplace_kept_input"], "an in-place step must return the state it was given"
    assert all(result[f"{path}_padded_kept"] for path in ("pytorch", "kernel", "inplace")), "a pad moved a state"
    errors = {key: value for key, value in result.items() if key.endswith(("_output", "_memory", "_conv"))}
    bad = {key: err for key, err in errors.items() if not err <= TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


if __name__ == "__main__":
    _main()
