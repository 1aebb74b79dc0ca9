"""linear_cross_entropy against the plain head + F.cross_entropy: loss and gradients, ignored rows, chunking."""
import pytest
import torch
import torch.nn.functional as F

from memmix.ops.linear_cross_entropy import linear_cross_entropy

from helpers import rel_err


def _inputs(N, D, V, dtype, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=dtype) / D**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignored] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float() if hidden.dtype != torch.float64
                           else F.linear(hidden, weight), labels, ignore_index=-100)


@pytest.mark.parametrize("N,chunk", [(1, 4), (37, 8), (64, 64), (100, 1000)])
def test_matches_the_plain_head_in_float64(N, chunk):
    hidden, weight, labels = _inputs(N, 12, 50, torch.float64, seed=N)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    grads = torch.autograd.grad(3.0 * loss, (hidden, weight))
    expected = _reference(hidden, weight, labels)
    expected_grads = torch.autograd.grad(3.0 * expected, (hidden, weight))
    assert rel_err(loss, expected) < 1e-12
    for got, want in zip(grads, expected_grads):
        assert rel_err(got, want) < 1e-12


def test_float32_and_all_rows_ignored():
    hidden, weight, labels = _inputs(40, 16, 30, torch.float32)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=7)
    assert loss.dtype == torch.float32
    assert rel_err(loss, _reference(hidden, weight, labels)) < 1e-5
    none = torch.full_like(labels, -100)
    empty = linear_cross_entropy(hidden, weight, none)
    assert empty.item() == 0.0
    dh, dw = torch.autograd.grad(empty, (hidden, weight))
    assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_without_gradients_makes_none():
    hidden, weight, labels = _inputs(20, 8, 10, torch.float64)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    assert not loss.requires_grad
    assert rel_err(loss, _reference(hidden, weight, labels)) < 1e-12


def test_bad_arguments_are_named():
    hidden, weight, labels = _inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="same D"):
        linear_cross_entropy(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="labels must be int64"):
        linear_cross_entropy(hidden, weight, labels[:2])
    with pytest.raises(ValueError, match="share one floating dtype"):
        linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_the_gpu_matches_the_float64_head():
    hidden, weight, labels = _inputs(8192, 256, 32000, torch.float64)
    h16 = hidden.detach().cuda().bfloat16().requires_grad_()
    w16 = weight.detach().cuda().bfloat16().requires_grad_()
    loss = linear_cross_entropy(h16, w16, labels.cuda(), chunk_size=2048)
    dh, dw = torch.autograd.grad(loss, (h16, w16))
    expected = _reference(hidden, weight, labels)
    edh, edw = torch.autograd.grad(expected, (hidden, weight))
    assert rel_err(loss.double().cpu(), expected) < 1e-2
    assert rel_err(dh.double().cpu(), edh) < 2e-2
    assert rel_err(dw.double().cpu(), edw) < 2e-2
