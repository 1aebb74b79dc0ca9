"""Router, load-balancing loss and modality groups (the dispatch plan: tests/ops/mom/test_mom_plan.py)."""
from __future__ import annotations

import pytest
import torch

from memmix.routing import load_balancing_loss, route


def test_route_picks_topk_and_renormalises():
    logits = torch.randn(2, 5, 6)
    d = route(logits, 3)
    assert d.indices.shape == (2, 5, 3)
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(2, 5))
    probs = logits.softmax(-1)
    expect = probs.gather(-1, d.indices)
    torch.testing.assert_close(d.weights, expect / expect.sum(-1, keepdim=True))
    assert (probs.gather(-1, d.indices).min(-1).values >= probs.topk(3).values[..., -1] - 1e-7).all()


def _loop_balance(logits: torch.Tensor, mask: torch.Tensor, M: int, k: int) -> torch.Tensor:
    probs = logits.reshape(-1, M).softmax(-1)
    keep = mask.reshape(-1).bool()
    probs = probs[keep]
    counts = torch.zeros(k, M)
    for row in probs:
        for rank, m in enumerate(row.topk(k).indices.tolist()):
            counts[rank, m] += 1
    return (counts / len(probs) * probs.mean(0)).sum() * M


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_balancing_loss_matches_a_loop_and_ignores_padding(k):
    M = 4
    logits = [torch.randn(2, 7, M), torch.randn(2, 7, M)]
    mask = torch.ones(2, 9)
    mask[0, :4] = 0  # left padding; the last 7 columns are used
    got = load_balancing_loss(logits, M, k, attention_mask=mask, mode="global")
    cols = mask[:, -7:]
    want = _loop_balance(torch.cat(logits), torch.cat([cols, cols]), M, k)
    torch.testing.assert_close(got, want)
    layerwise = load_balancing_loss(logits, M, k, attention_mask=mask, mode="layerwise")
    torch.testing.assert_close(layerwise, (_loop_balance(logits[0], cols, M, k) + _loop_balance(logits[1], cols, M, k)) / 2)
    # changing padded logits changes nothing
    noisy = [lg.clone() for lg in logits]
    noisy[0][0, :2] = 100 * torch.randn(2, M)
    torch.testing.assert_close(load_balancing_loss(noisy, M, k, attention_mask=mask), got)


def test_load_balancing_loss_is_minimal_when_balanced():
    M = 4
    balanced = torch.zeros(1, 8, M)
    balanced[0, torch.arange(8), torch.arange(8) % M] = 5.0
    collapsed = torch.zeros(1, 8, M)
    collapsed[0, :, 0] = 5.0
    assert load_balancing_loss(balanced, M, 1) < load_balancing_loss(collapsed, M, 1)
    with pytest.raises(ValueError, match="mode"):
        load_balancing_loss(balanced, M, 1, mode="sum")


def test_grouped_balance_is_the_mean_of_each_groups_own_loss():
    from memmix.routing import allowed_memories

    logits = torch.randn(2, 9, 6)
    modality = (torch.rand(2, 9) > 0.5).long()
    got = load_balancing_loss(logits, 6, 2, memory_groups=[4, 2], modality_ids=modality)
    per_group = []
    for g, (lo, hi) in enumerate([(0, 4), (4, 6)]):
        keep = (modality == g).float()
        per_group.append(_loop_balance(logits[..., lo:hi], keep, hi - lo, 2))
    torch.testing.assert_close(got, sum(per_group) / 2)
    allowed = allowed_memories(modality, [4, 2])
    d = route(logits, 2, allowed)
    assert ((d.indices >= 4) == modality.bool().unsqueeze(-1)).all()
