"""CausalSelfAttention's CUDA paths for packed documents (compiled FlexAttention, variable-length flash) against the
masked reference path in float64 on the CPU: values and gradients, odd document lengths, a document of length 1,
T not a multiple of the 128-token tile, GQA, a window; no recompilation when the documents change; a captured
training step."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from memmix.layers.attention import CausalSelfAttention

from helpers import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

D = 256
PACKINGS = {
    "odd_lengths_T_700": [0, 1, 130, 131, 388, 389, 700],  # length-1 documents, T not a multiple of 128
    "rows_4x256_cut_at_row_ends": [0, 100, 256, 512, 513, 768, 900, 1024],
}
# bf16: q, k, v and the output are rounded to 8 bits of mantissa; float32: the kernels' accumulation order
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def layer_pair(impl: str, num_kv_heads: int, window, seed: int) -> tuple[CausalSelfAttention, CausalSelfAttention]:
    """(the CUDA layer with packed_impl=impl, its float64 CPU copy on the masked reference path)."""
    torch.manual_seed(seed)
    reference = CausalSelfAttention(D, num_heads=4, num_kv_heads=num_kv_heads, window_size=window,
                                    packed_impl="mask").double()
    layer = copy.deepcopy(reference).float().cuda()
    layer.packed_impl = impl
    return layer, reference


def run(layer, x, cu_seqlens, grad_out, dtype):
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = layer(x, cu_seqlens=cu_seqlens).hidden_states
    grads = torch.autograd.grad(out, [x, *layer.parameters()], grad_out.to(out.dtype))
    return [out, *grads]


# each case compiles flex for its dtype / heads / window, so the cases are few and spread over the options
CASES = {
    "flex_fp32_mha": ("flex", torch.float32, 4, None, "odd_lengths_T_700"),
    "flex_bf16_gqa": ("flex", torch.bfloat16, 2, None, "rows_4x256_cut_at_row_ends"),
    "flex_bf16_mqa_window": ("flex", torch.bfloat16, 1, 200, "odd_lengths_T_700"),
    "varlen_bf16_mha": ("varlen", torch.bfloat16, 4, None, "rows_4x256_cut_at_row_ends"),
    "varlen_bf16_gqa": ("varlen", torch.bfloat16, 2, None, "odd_lengths_T_700"),
    "varlen_bf16_mqa_window": ("varlen", torch.bfloat16, 1, 200, "odd_lengths_T_700"),
}


@pytest.mark.parametrize("impl, dtype, num_kv_heads, window, packing", list(CASES.values()), ids=list(CASES))
def test_packed_kernel_matches_float64_reference(impl, dtype, num_kv_heads, window, packing):
    if impl == "varlen" and window is not None:
        from torch.nn.attention.varlen import varlen_attn

        if "window_size" not in inspect.signature(varlen_attn).parameters:
            pytest.skip("this torch's varlen_attn has no window")
    layer, reference = layer_pair(impl, num_kv_heads, window, seed=len(packing) + num_kv_heads)
    cu_seqlens = torch.tensor(PACKINGS[packing])
    T = int(cu_seqlens[-1])
    x = torch.randn(1, T, D, dtype=torch.float64)
    grad_out = torch.randn(1, T, D, dtype=torch.float64)
    expected = run(reference, x, cu_seqlens, grad_out, torch.float64)
    got = run(layer, x.cuda().float(), cu_seqlens.cuda(), grad_out.cuda(), dtype)
    names = ["out", "dx"] + [f"d{name}" for name, _ in reference.named_parameters()]
    errors = {name: rel_err(g.cpu(), e) for name, g, e in zip(names, got, expected)}
    assert all(err < TOLERANCE[dtype] for err in errors.values()), errors


def test_flex_does_not_recompile_when_the_documents_change():
    layer, _ = layer_pair("flex", 2, None, seed=0)
    x = torch.randn(1, 1024, D, device="cuda")
    layer(x, cu_seqlens=torch.tensor(PACKINGS["rows_4x256_cut_at_row_ends"], device="cuda"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for bounds in ([0, 1024], [0, 5, 6, 7, 512, 1000, 1024]):
            layer(x, cu_seqlens=torch.tensor(bounds, device="cuda")).hidden_states.sum().backward()


def test_captured_training_step_of_an_attention_model_follows_the_eager_one():
    """TrainStep(cuda_graph=True) over attention-tiny on packed rows: the flex path (block mask included) is
    captured and replayed with new documents each step; its losses follow the same steps replayed eagerly
    (EmulatedGraph: the same capturable Adam)."""
    from memmix.training.optim import build_optimizer, cosine_schedule
    from memmix.models.presets import build_model
    from helpers import EmulatedGraph
    from memmix.training.step import TrainStep

    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):  # 2 rows of 256 tokens, each cut into two documents: cu_seqlens keeps its shape
        first = int(torch.randint(1, 255, (1,), generator=gen))
        second = int(torch.randint(257, 511, (1,), generator=gen))
        ids = torch.randint(0, 320, (1, 512), generator=gen)
        batches.append((ids.cuda(), torch.tensor([0, first, 256, second, 512]).cuda()))
    losses = {}
    for recorder in (EmulatedGraph, None):
        torch.manual_seed(1)
        model = build_model("attention-tiny", 320).cuda()
        optimizer = build_optimizer(model, lr=1e-3)
        step = TrainStep(model, optimizer, cosine_schedule(optimizer, 2, 100),
                         lambda m, b: m(input_ids=b[0], cu_seqlens=b[1], labels=b[0], use_cache=False).loss,
                         cuda_graph=True, graph_recorder=recorder)
        losses[recorder] = step.read([step([batch]) for batch in batches])
    assert max(abs(a - b) for a, b in zip(losses[EmulatedGraph], losses[None])) < 1e-4, losses
