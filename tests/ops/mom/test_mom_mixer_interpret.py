"""The MoM mixer's Triton path (segment kernels, and the recurrence's kernel with impl="triton") against its PyTorch
path under Triton's CPU interpreter: outputs, the returned state and every gradient must agree; low_memory must
keep less for the backward and run the recurrence one head at a time.

TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in a child process (this file as a
script prints one JSON object) and the tests check them.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import count_recurrence_passes, forced_sequence_form, print_case_results, rel_err

SIZES = dict(D=24, H=2, K=16, V=16, M=4)
# name -> shape (B, T; "lengths" packs documents, B == 1; "left_pad" pads rows on the left; "cont" runs the first
# `cont` tokens, then the rest from the returned state), weight options (make_weights), k, impl, low_memory;
# the loss takes the outputs and (unless state_loss is False) the returned state.
CASES = {
    "batch2_T21": dict(B=2, T=21),
    "left_padding": dict(B=3, T=19, left_pad=[0, 5, 18]),
    "packed_documents": dict(B=1, lengths=[5, 1, 17, 9]),
    "continue_from_state": dict(B=2, T=60, cont=25),  # both parts > 16 tokens: the packed layout
    "continue_short_segments": dict(B=2, T=44, cont=20, weights=dict(M=8), k=1),  # tails reach into the old ones
    "k1_no_shared": dict(B=2, T=18, weights=dict(shared=False), k=1),
    "k_equals_M": dict(B=2, T=18, weights=dict(M=3), k=3),
    "single_kv_proj_expand_v2": dict(B=2, T=18, weights=dict(single_kv=True, V=32)),
    "gla_rule": dict(B=2, T=18, weights=dict(rule="gla")),
    "linear_rule_no_gates": dict(B=1, T=30, weights=dict(rule="linear")),
    # the recurrence on its Triton kernel too ("auto" takes the PyTorch chunk form on the CPU); then with
    # low_memory: the backward rebuilds the k/v projection of every memory (a feature group at a time), and the
    # recurrence runs one head at a time
    "triton_recurrence": dict(B=2, T=33, impl="triton", form="chunked"),
    "triton_recurrence_recurrent_form": dict(B=2, T=33, impl="triton", form="recurrent"),
    # (a loss on the returned conv tails would differentiate the whole projection through them: outputs only here)
    "low_memory": dict(B=2, T=33, impl="triton", low_memory=True, state_loss=False, form="chunked"),
    # as in training: no cache, so the projection is made without a graph and only the convolution keeps x
    "low_memory_training": dict(B=2, T=33, impl="triton", low_memory=True, use_cache=False, form="chunked"),
    # under bf16 autocast (forward only, as in training), low_memory against the default Triton path: the rebuild
    # takes the forward's bf16 inputs, so every output and gradient is the same -- but dx, which adds the three
    # feature groups' bf16 products in float32 where the default path makes one product (bf16 rounding apart)
    "low_memory_autocast": dict(B=2, T=33, autocast=True, against="default", use_cache=False,
                                tolerance={"dx": 1e-2}),
    # conv_scope "sequence" takes the PyTorch path's convolution whatever the impl, and with impl="triton" the
    # recurrence's Triton kernel over the packed segments (as on CUDA)
    "conv_scope_sequence": dict(B=3, T=33, left_pad=[0, 5, 30], impl="triton", conv_scope="sequence"),
    "conv_scope_sequence_continued": dict(B=2, T=44, cont=20, impl="triton", conv_scope="sequence"),
}
TOLERANCE = 1e-4
GRAD_NAMES = ("x", "routing_weights", "q_proj", "kv_proj", "conv", "A_log", "dt_bias")


def _inputs(case: dict, seed: int) -> dict:
    from _mom_utils import make_routing, make_weights

    options = {**SIZES, **case.get("weights", {})}
    rule, shared = options.pop("rule", "gated_delta"), options.get("shared", True)
    lengths = case.get("lengths")
    B, T = (1, sum(lengths)) if lengths else (case["B"], case["T"])
    weights = make_weights(rule, **options, dtype=torch.float32, seed=seed)
    ids, routing = make_routing(B, T, options["M"], case.get("k", 2), dtype=torch.float32, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    valid = torch.ones(B, T, dtype=torch.bool)
    for row, pad in enumerate(case.get("left_pad", [])):
        valid[row, :pad] = False
    return dict(x=torch.randn(B, T, SIZES["D"], generator=gen), memory_ids=ids, routing_weights=routing,
                weights=weights, valid=valid, cu_seqlens=torch.tensor([0] + lengths).cumsum(0) if lengths else None,
                kwargs=dict(rule=rule, num_heads=SIZES["H"], num_memories=options["M"], shared_memory=shared,
                            conv_scope=case.get("conv_scope", "segment")))


def _run(inputs: dict, case: dict, impl: str, low_memory: bool) -> dict:
    """Output, state and every gradient of one path as float64 tensors; "saved_shapes": the (shape, dtype) of the
    tensors autograd kept for the backward; "backward_shapes": the shapes of the tensors the backward made."""
    from memmix.ops.mom import MoMWeights, mom_mixer

    weights = MoMWeights(*(getattr(inputs["weights"], name).clone().requires_grad_(True) for name in GRAD_NAMES[2:]))
    x, routing = (inputs[name].clone().requires_grad_(True) for name in ("x", "routing_weights"))
    ids, valid, cu = inputs["memory_ids"], inputs["valid"], inputs["cu_seqlens"]
    use_cache = case.get("use_cache", True)

    def call(part: slice, **state):
        return mom_mixer(x[:, part], ids[:, part], routing[:, part], weights, **inputs["kwargs"], valid=valid[:, part],
                         cu_seqlens=cu, use_cache=use_cache, low_memory=low_memory, impl=impl, **state)

    saved = set()

    def keep(tensor):
        saved.add((tuple(tensor.shape), tensor.dtype))
        return tensor

    if case.get("cont"):
        c = case["cont"]
        first = call(slice(0, c))
        # detached, as in generation: the Triton path takes the incoming conv tails only without gradient
        second = call(slice(c, None), memory=first.memory.detach(), conv=first.conv.detach())
        o, memory, conv = torch.cat([first.o, second.o], 1), second.memory, second.conv
    else:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.get("autocast", False)):
            out = call(slice(None))
        o, memory, conv = out.o, out.memory, out.conv
    gen = torch.Generator().manual_seed(99)
    loss = (o * torch.randn(o.shape, generator=gen)).sum()
    if use_cache and case.get("state_loss", True):  # the returned state's gradient too
        loss = loss + (memory * torch.randn(memory.shape, generator=gen)).sum() + (conv * torch.randn(
            conv.shape, generator=gen)).sum()
    with _ShapesMade() as made:
        loss.backward()
    leaves = [x, routing] + [getattr(weights, name) for name in GRAD_NAMES[2:]]
    result = {"o": o.detach(), **({"memory": memory.detach(), "conv": conv.detach()} if use_cache else {})}
    result.update({"d" + name: leaf.grad for name, leaf in zip(GRAD_NAMES, leaves) if leaf.grad is not None})
    result = {key: value.double() for key, value in result.items()}
    return {**result, "saved_shapes": saved, "backward_shapes": made.shapes}


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
    """{"errors": relative error of each output and gradient of the Triton path against the reference path,
    "kept_kv_projection": whether the Triton path kept the (tokens, P, features) projection for its backward,
    "whole_kv_projection_in_backward": whether its backward made a tensor of that shape (the projection's gradient),
    "recurrence_passes": how many head groups its recurrence took, {"forward": n, "backward": n},
    "kept_float32_flat_input": whether it kept a float32 (tokens, D) copy of x}."""
    from memmix.ops.mom.triton_path import runs_on

    assert runs_on(torch.zeros(1)), "the interpreter path is not active"
    case = CASES[name]
    inputs = _inputs(case, seed)
    if case.get("against") == "default":  # the default Triton path, then the same with low_memory
        expected = _run(inputs, case, "auto", low_memory=False)
        low_memory = True
    else:
        expected = _run(inputs, case, "chunk", low_memory=False)  # the PyTorch path
        low_memory = case.get("low_memory", False)
    # the recurrence's form: the case's (head groups and passes are the chunked kernels'), else the one
    # memmix.ops.triton picks for these narrow heads
    with count_recurrence_passes() as passes, forced_sequence_form(case.get("form")):
        actual = _run(inputs, case, case.get("impl", "auto"), low_memory)  # the Triton path under the interpreter
    saved, made_in_backward = actual.pop("saved_shapes"), actual.pop("backward_shapes")
    for key in ("saved_shapes", "backward_shapes"):
        expected.pop(key)
    missing = set(expected) ^ set(actual)
    # an all-but-zero reference (gate gradients at k = 1) is compared in absolute terms
    errors = {key: rel_err(actual[key], expected[key], floor=1e-6) for key in expected if key in actual}
    errors.update({key: float("inf") for key in missing})
    B, T = inputs["x"].shape[:2]
    kv_proj = inputs["weights"].kv_proj
    kv_shape = (B * T, kv_proj.shape[0], kv_proj.shape[1])
    return {"errors": errors, "kept_kv_projection": kv_shape in {shape for shape, _ in saved},
            "whole_kv_projection_in_backward": kv_shape in made_in_backward, "recurrence_passes": passes,
            "kept_float32_flat_input": ((B * T, SIZES["D"]), torch.float32) in saved}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_path_matches_pytorch_path(interpret_results, name):
    errors = interpret_results[name]["errors"]
    expected = {"o", "dx", "drouting_weights", "dq_proj", "dkv_proj", "dconv"}
    if CASES[name].get("use_cache", True):
        expected |= {"memory", "conv"}
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
        assert low["recurrence_passes"] == {"forward": SIZES["H"], "backward": SIZES["H"]}
        assert low["kept_float32_flat_input"]  # float32 inputs: x itself
    # under autocast the rebuild keeps the bf16 cast of x, not a float32 copy
    assert not interpret_results["low_memory_autocast"]["kept_float32_flat_input"]


def test_segment_conv_checks_kv_inputs():
    pytest.importorskip("triton")
    from memmix.ops.mom.plan import SegmentRows
    from memmix.ops.mom.triton_path import FeatureGroups, segment_conv

    empty = torch.zeros(0, dtype=torch.int32)
    rows = SegmentRows(empty, empty, empty, empty, torch.zeros(4, 1, dtype=torch.int32), num_segments=0)
    kv_src = torch.zeros(4, 2, 10)
    with pytest.raises(ValueError, match=r"kv_inputs must be x \(T_tok, D\) and w \(P \* F, D\)"):
        segment_conv(torch.zeros(4, 2), kv_src, torch.zeros(6, 4), rows, FeatureGroups(1, 2, 2, 6, 4),
                     kv_inputs=(torch.zeros(4, 8), torch.zeros(10, 8)))  # w must have 2 x 10 rows
    with pytest.raises(ValueError, match=r"kv_inputs x and w must have kv_src's dtype torch.float32"):
        segment_conv(torch.zeros(4, 2), kv_src, torch.zeros(6, 4), rows, FeatureGroups(1, 2, 2, 6, 4),
                     kv_inputs=(torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(20, 8, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="tails must not require grad"):
        segment_conv(torch.zeros(4, 2), kv_src, torch.zeros(6, 4), rows, FeatureGroups(1, 2, 2, 6, 4),
                     tails=torch.zeros(0, 3, 6, requires_grad=True))


def test_segment_conv_rebuild_takes_no_tokens():
    pytest.importorskip("triton")
    from memmix.ops.mom.plan import SegmentRows
    from memmix.ops.mom.triton_path import FeatureGroups, segment_conv

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
    print_case_results(run_case, CASES)
