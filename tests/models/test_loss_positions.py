"""loss_positions: the LM head and the loss at the named positions only equal the full-head loss over them."""
from __future__ import annotations

import pytest
import torch

from memmix.models import causal_lm_loss

from models_helpers import VOCAB, random_ids, tiny_bmojo, tiny_model

TOL = dict(rtol=1e-12, atol=1e-12)


MODELS = {
    "mom": lambda seed: tiny_model(seed),
    "mom-hybrid-experts": lambda seed: tiny_model(seed, num_hidden_layers=3, attn_layers=[1],
                                                   ffn_experts={"text": 2}, ffn_routing="token_choice"),
    "bmojo": tiny_bmojo,
}


def query_positions(batch: int, length: int, q: int, seed: int) -> torch.Tensor:
    """(batch, q) distinct random positions in [0, length - 1) per row, except the last slot of row 0, which
    repeats its first position (how a caller pads rows with fewer queries)."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(length - 1, generator=generator)[:q] for _ in range(batch)])
    positions[0, -1] = positions[0, 0]
    return positions


def scored_labels(positions: torch.Tensor, length: int, seed: int) -> torch.Tensor:
    """(B, length) labels that are -100 except at positions + 1; also -100 at the first position of every row
    (a -100 label among the positions, and the repeated one of row 0)."""
    batch, q = positions.shape
    rows = torch.arange(batch)[:, None]
    labels = torch.full((batch, length), -100, dtype=torch.long)
    labels[rows, positions + 1] = random_ids(batch, q, seed=seed)
    labels[rows[:, 0], positions[:, 0] + 1] = -100
    return labels


def loss_and_grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", MODELS)
def test_positions_loss_and_gradients_equal_the_full_head_in_float64(name):
    model = MODELS[name](seed=3).train()  # training: the MoM loss includes its auxiliary losses
    ids, positions = random_ids(3, 13, seed=5), query_positions(3, 13, q=4, seed=5)
    labels = scored_labels(positions, 13, seed=6)
    full, full_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    part, part_grads = loss_and_grads(model, input_ids=ids, labels=labels, loss_positions=positions)
    assert part.logits.shape == (3, 4, VOCAB)
    torch.testing.assert_close(part.logits, full.logits[torch.arange(3)[:, None], positions], **TOL)
    torch.testing.assert_close(part.loss, full.loss, **TOL)
    if getattr(full, "aux_loss", None) is not None:
        torch.testing.assert_close(part.aux_loss, full.aux_loss, **TOL)
    assert part_grads.keys() == full_grads.keys()
    for key in full_grads:
        torch.testing.assert_close(part_grads[key], full_grads[key], **TOL, msg=key)


@pytest.mark.parametrize("name", ["mom", "bmojo"])
def test_padding_and_packed_documents_are_ignored_as_in_the_full_loss(name):
    model = MODELS[name](seed=4).eval()
    ids, positions = random_ids(2, 12, seed=6), query_positions(2, 12, q=5, seed=6)
    positions[1] = torch.tensor([5, 2, 9, 0, 10])  # 2 predicts token 3, a pad: not scored
    labels = scored_labels(positions, 12, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    assert labels[1, 3] != -100
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        part = model(input_ids=ids, attention_mask=mask, labels=labels, loss_positions=positions).loss
        torch.testing.assert_close(part, full, **TOL)
        cu_seqlens = torch.tensor([0, 5, 12])
        packed_positions = torch.tensor([[4, 0, 6, 10]])  # 4: the last token of document 0, not scored
        packed_labels = torch.full((1, 12), -100, dtype=torch.long)
        packed_labels[0, packed_positions[0] + 1] = torch.tensor([3, 5, 7, 9])
        full = model(input_ids=ids[:1], cu_seqlens=cu_seqlens, labels=packed_labels, use_cache=False).loss
        part = model(input_ids=ids[:1], cu_seqlens=cu_seqlens, labels=packed_labels, use_cache=False,
                     loss_positions=packed_positions).loss
        torch.testing.assert_close(part, full, **TOL)


def test_function_matches_the_full_loss_and_needs_no_labels_for_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, VOCAB, dtype=torch.float64, generator=generator)
    labels = random_ids(2, 7, seed=1)
    labels[0, 2] = -100
    positions = torch.tensor([[0, 1, 5], [3, 4, 2]])
    kept = torch.full_like(labels, -100)
    kept[torch.arange(2)[:, None], positions + 1] = labels[torch.arange(2)[:, None], positions + 1]
    picked = logits[torch.arange(2)[:, None], positions]
    torch.testing.assert_close(causal_lm_loss(picked, labels, loss_positions=positions),
                               causal_lm_loss(logits, kept), **TOL)
    model = tiny_model(seed=2)
    ids = random_ids(2, 7, seed=3)
    with torch.no_grad():
        out = model(input_ids=ids, loss_positions=positions)
        assert out.loss is None
        torch.testing.assert_close(out.logits, model(input_ids=ids).logits[torch.arange(2)[:, None], positions])


BAD = [
    (lambda ids: ids[:, :3].int(), r"loss_positions must be an int64 tensor of shape \(B=2, Q >= 1\), got torch.int32"),
    (lambda ids: torch.tensor([1, 2]), r"loss_positions must be an int64 tensor of shape \(B=2, Q >= 1\)"),
    (lambda ids: torch.zeros(3, 2, dtype=torch.long), r"shape \(B=2, Q >= 1\), got torch.int64 \(3, 2\)"),
    (lambda ids: torch.zeros(2, 0, dtype=torch.long), r"shape \(B=2, Q >= 1\), got torch.int64 \(2, 0\)"),
    (lambda ids: [[0, 1], [2, 3]], r"loss_positions must be an int64 tensor .* got 'list'"),
    (lambda ids: torch.tensor([[0, 8], [1, 2]]), r"loss_positions must be in \[0, T - 1 = 8\).* got values in \[0, 8\]"),
    (lambda ids: torch.tensor([[0, -1], [1, 2]]), r"loss_positions must be in \[0, T - 1 = 8\)"),
]


@pytest.mark.parametrize("make, match", BAD)
def test_bad_loss_positions_name_the_argument(make, match):
    model = tiny_model(seed=0)
    ids = random_ids(2, 9, seed=1)
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, labels=ids, loss_positions=make(ids))


def test_loss_positions_conflicts_name_the_arguments():
    model = tiny_bmojo(seed=0)
    ids = random_ids(2, 9, seed=1)
    positions = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="pass loss_positions or logits_to_keep, not both"):
        model(input_ids=ids, loss_positions=positions, logits_to_keep=1)
    with pytest.raises(ValueError, match=r"labels must have shape \(B, T\) = \(2, 9\), got \(2, 8\)"):
        model(input_ids=ids, labels=ids[:, :8], loss_positions=positions)
    with pytest.raises(ValueError, match="loss_positions needs T >= 2"):
        model(input_ids=ids[:, :1], loss_positions=positions[:, :1] * 0)
