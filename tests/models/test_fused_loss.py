"""model.fused_loss: the head and the cross-entropy a chunk at a time give the plain loss and its gradients."""
from __future__ import annotations

import pytest
import torch

from memmix.models.loss import next_token_targets

from models_helpers import random_ids, tiny_bmojo, tiny_model

MODELS = {"mom": tiny_model, "bmojo": tiny_bmojo}


def _loss_and_grads(model, fused: bool, **inputs):
    model.fused_loss = fused
    out = model(**inputs)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return out, grads


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("case", ["plain", "padding", "documents", "positions"])
def test_fused_loss_equals_the_plain_loss(name, case):
    model = MODELS[name](seed=3)
    ids = random_ids(2, 13, seed=4)
    inputs = dict(input_ids=ids, labels=ids.clone())
    if case == "padding":
        inputs["attention_mask"] = torch.tensor([[0, 0, 0] + [1] * 10, [1] * 13])
        inputs["labels"][0, :3] = -100
    elif case == "documents":
        inputs = dict(input_ids=ids[:1], labels=ids[:1], cu_seqlens=torch.tensor([0, 4, 5, 13]), use_cache=False)
    elif case == "positions":
        inputs["loss_positions"] = torch.tensor([[0, 5, 11], [2, 2, 7]])
    plain, plain_grads = _loss_and_grads(model, False, **inputs)
    fused, fused_grads = _loss_and_grads(model, True, **inputs)
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_loss_under_bf16_autocast_is_close():
    model = tiny_model(seed=5, dtype=torch.float32)
    ids = random_ids(2, 16, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.fused_loss = False
        plain = model(input_ids=ids, labels=ids).loss
        model.fused_loss = True
        fused = model(input_ids=ids, labels=ids).loss
    assert abs(fused.item() - plain.item()) < 2e-2 * abs(plain.item())


def test_targets_ignore_bounds_padded_with_empty_documents():
    """A CUDA graph needs a fixed number of bounds: padding cu_seqlens with T (empty documents) changes nothing."""
    labels = random_ids(1, 10, seed=1)
    exact = next_token_targets(labels, cu_seqlens=torch.tensor([0, 3, 10]))
    padded = next_token_targets(labels, cu_seqlens=torch.tensor([0, 3, 10, 10, 10]))
    assert torch.equal(exact, padded) and exact[0, 2] == -100 and (exact[0, 3:] != -100).all()
