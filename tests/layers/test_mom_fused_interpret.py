"""The MoM layer's Triton dispatch path (memmix.ops.segments) against its PyTorch path, under Triton's CPU
interpreter: outputs, every gradient and the returned state must agree.

TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in a child process (this file
as a script prints one JSON object of relative errors) and the tests check them.
"""
from __future__ import annotations

import pytest
import torch

from helpers import print_case_results, rel_err

BASE = dict(hidden_size=24, num_heads=2, head_dim=16, num_memories=4, topk=2, shared_mem=True)
# name -> layer options and input shape: B, T; "lengths" packs documents (B == 1); "left_pad" pads rows on
# the left; "continue" runs the first `continue` tokens, then the rest from the returned state.
CASES = {
    "batch2_T21": dict(B=2, T=21),
    "left_padding": dict(B=3, T=19, left_pad=[0, 5, 18]),
    "packed_documents": dict(B=1, lengths=[5, 1, 17, 9]),
    "continue_from_state": dict(B=2, T=60, cont=25),  # both parts > 16 tokens: the packed layout
    "continue_short_segments": dict(B=2, T=44, cont=20, layer=dict(num_memories=8, topk=1)),  # tails reach in
    "k1_no_shared": dict(B=2, T=18, layer=dict(topk=1, shared_mem=False)),
    "k_equals_M": dict(B=2, T=18, layer=dict(num_memories=3, topk=3)),
    "single_kv_proj_expand_v2": dict(B=2, T=18, layer=dict(single_kv_proj=True, expand_v=2.0)),
    "gla_rule": dict(B=2, T=18, layer=dict(memory_rule="gla")),
    "linear_rule_no_gates": dict(B=1, T=30, layer=dict(memory_rule="linear", use_output_gate=False)),
}
TOLERANCE = 1e-4


def _layer(case: dict, seed: int):
    from memmix.layers import MixtureOfMemories

    torch.manual_seed(seed)
    layer = MixtureOfMemories(**{**BASE, **case.get("layer", {})})
    with torch.no_grad():  # non-trivial conv weights and decay
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _inputs(case: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = case.get("lengths")
    B, T = (1, sum(lengths)) if lengths else (case["B"], case["T"])
    x = torch.randn(B, T, BASE["hidden_size"], generator=gen)
    inputs = {"x": x, "attention_mask": None, "cu_seqlens": None}
    if lengths:
        inputs["cu_seqlens"] = torch.tensor([0] + lengths).cumsum(0)
    if case.get("left_pad"):
        mask = torch.ones(B, T, dtype=torch.long)
        for row, pad in enumerate(case["left_pad"]):
            mask[row, :pad] = 0
        inputs["attention_mask"] = mask
    return inputs


def _run(layer, inputs: dict, case: dict, impl: str) -> dict:
    """Output, state and every gradient (x and parameters) of one path, as float64 tensors."""
    from memmix.layers.mom import MoMState

    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    x = inputs["x"].clone().requires_grad_(True)
    kwargs = dict(attention_mask=inputs["attention_mask"], cu_seqlens=inputs["cu_seqlens"])
    out = {}
    if case.get("cont"):
        c = case["cont"]
        first = layer(x[:, :c], use_cache=True)
        # detached, as in generation: the Triton path takes the incoming conv tails only without gradient
        carried = MoMState(first.state.memory.detach(), first.state.conv.detach(), first.state.num_routed)
        second = layer(x[:, c:], state=carried, use_cache=True)
        y = torch.cat([first.hidden_states, second.hidden_states], 1)
        state = second.state
    else:
        result = layer(x, use_cache=True, **kwargs)
        y, state = result.hidden_states, result.state
    gen = torch.Generator().manual_seed(99)
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    out["output"] = y.detach()
    out["state_memory"] = state.memory.detach()
    out["state_conv"] = state.conv.detach()
    out["dx"] = x.grad
    out.update({"d" + name: p.grad for name, p in layer.named_parameters() if p.grad is not None})
    return {k: v.double() for k, v in out.items()}


def run_case(name: str, seed: int) -> dict:
    case = CASES[name]
    layer = _layer(case, seed)
    inputs = _inputs(case, seed)
    expected = _run(layer, inputs, case, "chunk")  # PyTorch dispatch
    actual = _run(layer, inputs, case, "auto")  # Triton dispatch under the interpreter
    missing = set(expected) ^ set(actual)
    # an all-but-zero reference (gate gradients at k = 1) is compared in absolute terms
    errors = {key: rel_err(actual[key], expected[key], floor=1e-6) for key in expected if key in actual}
    errors.update({key: float("inf") for key in missing})
    return errors


def _main() -> None:
    import memmix.layers.mom as mom

    assert mom.triton_ops.is_available(torch.zeros(1)), "the interpreter path is not active"
    print_case_results(run_case, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_dispatch_matches_pytorch_dispatch(interpret_results, name):
    errors = interpret_results[name]
    assert {"output", "state_memory", "state_conv", "dx", "dq_proj.weight", "dk_proj", "dv_proj",
            "dq_conv1d.weight", "dgate.weight", "do_proj.weight"} <= set(errors)
    bad = {key: err for key, err in errors.items() if not err <= TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


if __name__ == "__main__":
    _main()
