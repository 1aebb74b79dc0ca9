"""CUDA-graph decoding gives exactly what the eager decode gives (GPU), and the in-place decode step it
captures equals the functional one (CPU)."""
from __future__ import annotations

import pytest
import torch

from memmix import MoMConfig, MoMForCausalLM
from memmix.layers import MixtureOfMemories


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])  # differentiable step / ops.memory_step
def test_inplace_decode_step_equals_functional_step(grad):
    torch.manual_seed(0)
    layer = MixtureOfMemories(16, num_heads=2, head_dim=4, num_memories=4, topk=2).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    state = layer(x[:, :8], use_cache=True).state
    with torch.set_grad_enabled(grad):
        functional = layer(x[:, 8:], state=state, use_cache=True)
        copy = type(state)(state.memory.clone(), state.conv.clone(), state.num_routed)
        layer.inplace_decode = True
        inplace = layer(x[:, 8:], state=copy, use_cache=True)
    assert inplace.state is copy
    assert torch.equal(inplace.hidden_states, functional.hidden_states)
    assert torch.equal(copy.memory, functional.state.memory) and torch.equal(copy.conv, functional.state.conv)


def _model(device="cuda", **options):
    torch.manual_seed(0)
    config = MoMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32,
                       num_memories=4, topk=2, shared_mem=True, **options)
    return MoMForCausalLM(config).to(device).eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("options", [dict(), dict(router_input="conv", conv_scope="sequence")],
                         ids=["default", "router_conv-conv_sequence"])  # the router's tail is graphed state too
def test_graph_generate_equals_eager_generate_with_left_padding(options):
    model = _model(**options)
    ids = torch.randint(0, 97, (3, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    model.cuda_graph_decoding = False
    eager = model.generate(ids, **kwargs)
    model.cuda_graph_decoding = True
    graphed = model.generate(ids, **kwargs)
    assert model._graph_decoders, "the decode steps did not go through the CUDA graph"
    assert torch.equal(eager, graphed)
    # the same graph serves a second call with another prompt of the same batch size
    ids2 = torch.randint(0, 97, (3, 5), device="cuda")
    model.cuda_graph_decoding = False
    eager2 = model.generate(ids2, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.cuda_graph_decoding = True
    assert torch.equal(model.generate(ids2, max_new_tokens=8, do_sample=False, pad_token_id=0), eager2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_generate_equals_uncached_generate():
    """Greedy tokens from the captured decode step equal those of the uncached path, which re-runs the whole
    sequence through the chunked Triton kernels at every step (prompt of 70 > one chunk of 64)."""
    model = _model()
    ids = torch.randint(0, 97, (2, 70), device="cuda")
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    model.cuda_graph_decoding = True
    graphed = model.generate(ids, **kwargs)
    assert model._graph_decoders, "the decode steps did not go through the CUDA graph"
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert graphed.shape == (2, 82)
    assert torch.equal(graphed, uncached)
