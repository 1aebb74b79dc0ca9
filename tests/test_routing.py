"""Router, load-balancing loss and the dispatch plan."""
from __future__ import annotations

import pytest
import torch

from memmix.routing import load_balancing_loss, plan_dispatch, route


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


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_plan_groups_slots_by_segment_in_time_order(layout):
    B, T, S, P = 3, 11, 2, 5
    ids = torch.stack([torch.randperm(P)[:S] for _ in range(B * T)]).view(B, T, S)
    valid = torch.rand(B, T) > 0.2
    plan = plan_dispatch(ids, valid, P, layout=layout)
    payload = torch.arange(B * T * S, dtype=torch.float64).view(B, T, S, 1)
    buf = plan.dispatch(payload)[:, 0]
    for b in range(B):
        for m in range(P):
            seg = b * P + m
            want = [payload[b, t, s, 0].item() for t in range(T) for s in range(S) if valid[b, t] and ids[b, t, s] == m]
            start = plan.starts[seg].item()
            assert plan.counts[seg].item() == len(want)
            assert buf[start : start + len(want)].tolist() == want
    back = plan.collect(plan.dispatch(payload))
    torch.testing.assert_close(back, payload * valid.view(B, T, 1, 1))


def test_plan_with_documents_restarts_each_segment():
    T, S, P = 12, 1, 2
    ids = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0]).view(1, T, S)
    cu = torch.tensor([0, 4, 4, 9, 12])
    plan = plan_dispatch(ids, torch.ones(1, T, dtype=torch.bool), P, cu_seqlens=cu)
    counts = plan.counts.view(4, P)
    for d in range(4):
        seg_ids = ids[0, cu[d] : cu[d + 1], 0]
        assert counts[d].tolist() == [int((seg_ids == m).sum()) for m in range(P)]
    # token order inside (document, memory) segments follows time
    buf = plan.dispatch(torch.arange(T, dtype=torch.float64).view(1, T, 1, 1))[:, 0]
    assert buf[plan.starts[4] : plan.starts[5]].tolist() == [6.0, 8.0]  # document 2 (t = 4..8), memory 0


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
