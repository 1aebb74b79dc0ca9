"""The MoM layer's Triton dispatch path (memmix.ops.segments) against its PyTorch path, under Triton's CPU
interpreter: outputs, every gradient and the returned state must agree.

TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in a child process (this file
as a script prints one JSON object of relative errors) and the tests check them.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    # the recurrence on its Triton kernel too ("auto" takes the PyTorch chunk form on the CPU); then with
    # low_memory: the backward rebuilds the k/v projection of every memory (a feature group at a time), and the
    # recurrence runs one head at a time
    "triton_recurrence": dict(B=2, T=33, impl="triton"),
    "low_memory": dict(B=2, T=33, impl="triton", layer=dict(low_memory=True)),
    # as in training: no cache, so the projection is made without a graph and only the convolution keeps x
    "low_memory_training": dict(B=2, T=33, impl="triton", layer=dict(low_memory=True), use_cache=False),
    # under bf16 autocast (forward only, as in training), low_memory against the default Triton path: the rebuild
    # takes the forward's bf16 inputs, so every output and gradient is the same -- but dx, which adds the three
    # feature groups' bf16 products in float32 where the default path makes one product (bf16 rounding apart)
    "low_memory_autocast": dict(B=2, T=33, autocast=True, against="default", tolerance={"dx": 1e-2}),
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
    """Output, state and every gradient (x and parameters) of one path, as float64 tensors; plus, under
    "saved_shapes", the (shape, dtype) of the tensors that autograd kept for the backward."""
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
        saved_shapes = set()

        def keep(tensor):
            saved_shapes.add((tuple(tensor.shape), tensor.dtype))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.get("autocast", False)):
            result = layer(x, use_cache=case.get("use_cache", True), **kwargs)
        y, state = result.hidden_states, result.state
        out["saved_shapes"] = saved_shapes
    gen = torch.Generator().manual_seed(99)
    loss = (y * torch.randn(y.shape, generator=gen)).sum()
    with _ShapesMade() as made:
        loss.backward()
    out["backward_shapes"] = made.shapes
    out["output"] = y.detach()
    if state is not None:
        out["state_memory"] = state.memory.detach()
        out["state_conv"] = state.conv.detach()
    out["dx"] = x.grad
    out.update({"d" + name: p.grad for name, p in layer.named_parameters() if p.grad is not None})
    return {k: v if k.endswith("_shapes") else v.double() for k, v in out.items()}


class _ShapesMade(TorchDispatchMode):
    """The shapes of every tensor that an op makes inside the block."""

    def __enter__(self):
        self.shapes = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def run_case(name: str, seed: int) -> dict:
    """{"errors": relative error of each output and gradient of the Triton path against the PyTorch path,
    "kept_kv_projection": whether the Triton path kept the (tokens, P, features) projection for its backward,
    "whole_kv_projection_in_backward": whether its backward made a tensor of that shape (the projection's gradient),
    "recurrence_passes": how many head groups its recurrence took, {"forward": n, "backward": n},
    "kept_float32_flat_input": whether it kept a float32 (tokens, hidden) copy of x}."""
    from memmix.ops.triton import gated_delta_rule as kernels

    case = CASES[name]
    layer = _layer(case, seed)
    inputs = _inputs(case, seed)
    if case.get("against") == "default":  # the default Triton path, then the same layer with low_memory
        expected = _run(layer, inputs, case, "auto")
        layer.low_memory = True
    else:
        expected = _run(layer, inputs, case, "chunk")  # PyTorch dispatch
    passes = {"forward": 0, "backward": 0}  # launches of the chunk output kernel / the backward sequential kernel
    originals = {"forward": kernels._output, "backward": kernels._state_grad}

    def counted(direction):
        def launch(*args, **kwargs):
            passes[direction] += 1
            return originals[direction](*args, **kwargs)
        return launch

    kernels._output, kernels._state_grad = counted("forward"), counted("backward")
    try:
        actual = _run(layer, inputs, case, case.get("impl", "auto"))  # Triton dispatch under the interpreter
    finally:
        kernels._output, kernels._state_grad = originals["forward"], originals["backward"]
    saved = actual.pop("saved_shapes", set())
    saved_shapes = {shape for shape, _ in saved}
    made_in_backward = actual.pop("backward_shapes", set())
    expected.pop("saved_shapes", None)
    expected.pop("backward_shapes", None)
    missing = set(expected) ^ set(actual)
    # an all-but-zero reference (gate gradients at k = 1) is compared in absolute terms
    errors = {key: rel_err(actual[key], expected[key], floor=1e-6) for key in expected if key in actual}
    errors.update({key: float("inf") for key in missing})
    B, T = inputs["x"].shape[:2]
    kv_shape = (B * T, layer.k_proj.shape[0], layer._stacked_kv_weight().shape[1])
    return {"errors": errors, "kept_kv_projection": kv_shape in saved_shapes,
            "whole_kv_projection_in_backward": kv_shape in made_in_backward,
            "recurrence_passes": passes,
            "kept_float32_flat_input": ((B * T, BASE["hidden_size"]), torch.float32) in saved}


def _main() -> None:
    import memmix.layers.mom as mom

    assert mom.triton_ops.is_available(torch.zeros(1)), "the interpreter path is not active"
    print_case_results(run_case, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_dispatch_matches_pytorch_dispatch(interpret_results, name):
    errors = interpret_results[name]["errors"]
    expected = {"output", "dx", "dq_proj.weight", "dk_proj", "dv_proj", "dq_conv1d.weight", "dgate.weight",
                "do_proj.weight"}
    if CASES[name].get("use_cache", True):
        expected |= {"state_memory", "state_conv"}
    assert expected <= set(errors)
    tolerance = {key: CASES[name].get("tolerance", {}).get(key, TOLERANCE) for key in errors}
    bad = {key: (err, tolerance[key]) for key, err in errors.items() if not err <= tolerance[key]}
    assert not bad, f"(relative error, tolerance) above tolerance: {bad}"


def test_low_memory_rebuilds_the_projection_by_groups_and_runs_one_head_at_a_time(interpret_results):
    default = interpret_results["triton_recurrence"]
    assert default["kept_kv_projection"] and default["recurrence_passes"] == {"forward": 1, "backward": 1}
    # the default path's backward makes the projection's whole gradient
    assert default["whole_kv_projection_in_backward"]
    for low in (interpret_results["low_memory"], interpret_results["low_memory_training"]):
        assert not low["kept_kv_projection"]
        assert not low["whole_kv_projection_in_backward"]  # one feature group at a time
        assert low["recurrence_passes"] == {"forward": BASE["num_heads"], "backward": BASE["num_heads"]}
        assert low["kept_float32_flat_input"]  # float32 layer: x itself
    # under autocast the rebuild keeps the bf16 cast of x, not a float32 copy
    assert not interpret_results["low_memory_autocast"]["kept_float32_flat_input"]


def test_low_memory_is_checked():
    from memmix.layers import MixtureOfMemories

    with pytest.raises(ValueError, match="low_memory must be True or False"):
        MixtureOfMemories(**BASE, low_memory="yes")


def test_segment_conv_checks_kv_inputs():
    pytest.importorskip("triton")
    from memmix.ops.segments import FeatureGroups, SegmentRows, segment_conv

    empty = torch.zeros(0, dtype=torch.int32)
    rows = SegmentRows(empty, empty, empty, empty, torch.zeros(4, 1, dtype=torch.int32), num_segments=0)
    kv_src = torch.zeros(4, 2, 10)
    with pytest.raises(ValueError, match=r"kv_inputs must be x \(T_tok, D\) and w \(P \* F, D\)"):
        segment_conv(torch.zeros(4, 2), kv_src, torch.zeros(6, 4), rows, FeatureGroups(1, 2, 2, 6, 4),
                     kv_inputs=(torch.zeros(4, 8), torch.zeros(10, 8)))  # w must have 2 x 10 rows
    with pytest.raises(ValueError, match=r"kv_inputs x and w must have kv_src's dtype torch.float32"):
        segment_conv(torch.zeros(4, 2), kv_src, torch.zeros(6, 4), rows, FeatureGroups(1, 2, 2, 6, 4),
                     kv_inputs=(torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(20, 8, dtype=torch.bfloat16)))


def test_segment_conv_rebuild_takes_no_tokens():
    pytest.importorskip("triton")
    from memmix.ops.segments import FeatureGroups, SegmentRows, segment_conv

    empty = torch.zeros(0, dtype=torch.int32)
    rows = SegmentRows(empty, empty, empty, empty, torch.zeros(0, 3, dtype=torch.int32), num_segments=0)
    q_src, x = torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 8, requires_grad=True)
    w, conv = torch.randn(2 * 10, 8, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    kv_src = (x @ w.t()).detach().view(0, 2, 10)
    outputs = segment_conv(q_src, kv_src, conv, rows, FeatureGroups(1, 2, 2, 6, 4), kv_inputs=(x, w))
    sum(o.sum() for o in outputs).backward()
    assert x.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros(20, 8))
    assert torch.equal(conv.grad, torch.zeros(6, 4))


if __name__ == "__main__":
    _main()
