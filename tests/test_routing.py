"""Router (with a temperature), load-balancing loss, z-loss and modality groups (the dispatch plan:
tests/ops/mom/test_mom_plan.py)."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import hand_z_loss
from memmix.routing import load_balancing_loss, route, router_z_loss


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


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 7.0])
def test_temperature_routes_by_a_hand_softmax_of_the_tempered_logits(temperature):
    logits = 3 * torch.randn(3, 6, 5, dtype=torch.float64)
    d = route(logits, 2, temperature=temperature)
    for b in range(3):
        for t in range(6):
            row = [float(v) / temperature for v in logits[b, t]]
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            probs = [e / sum(exps) for e in exps]
            picks = sorted(range(5), key=lambda m: -probs[m])[:2]
            assert d.indices[b, t].tolist() == picks
            want = torch.tensor([probs[m] for m in picks]) / sum(probs[m] for m in picks)
            torch.testing.assert_close(d.weights[b, t].double(), want.double(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(d.logits[b, t].double(), torch.tensor(row, dtype=torch.float64), rtol=1e-6,
                                       atol=1e-6)
    # the same picks at every temperature; the weights flatter as it rises
    plain = route(logits, 2)
    assert torch.equal(d.indices, plain.indices)
    spread, plain_spread = ((r.weights[..., 0] - r.weights[..., 1]).mean() for r in (d, plain))
    if temperature > 1:
        assert spread < plain_spread
    if temperature == 1.0:  # the default computes exactly what it did before the option
        assert torch.equal(d.weights, plain.weights) and torch.equal(d.logits, logits.float())


def test_temperature_reaches_the_load_balancing_loss_through_the_logits():
    """The load-balancing loss reads the tempered logits the router returns: its P_m are the routing
    probabilities, and its f_m are unchanged (a positive temperature keeps the order)."""
    logits = 3 * torch.randn(2, 9, 4)
    tempered = route(logits, 2, temperature=4.0).logits
    got = load_balancing_loss(tempered, 4, 2)
    torch.testing.assert_close(got, _loop_balance(logits / 4.0, torch.ones(2, 9), 4, 2))
    assert not torch.allclose(got, load_balancing_loss(logits, 4, 2))


@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_z_loss_matches_a_hand_computation_and_ignores_padding(mode):
    logits = [2 * torch.randn(2, 7, 4), 2 * torch.randn(2, 7, 4) + 1]
    mask = torch.ones(2, 9)
    mask[0, :4] = 0  # left padding; the last 7 columns are used
    mask[1, 5] = 0
    got = router_z_loss(logits, attention_mask=mask, mode=mode)
    cols = mask[:, -7:]
    want = (hand_z_loss([logits[0]], cols) + hand_z_loss([logits[1]], cols)) / 2  # every layer sees the same tokens
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert router_z_loss(logits[0]).item() == pytest.approx(hand_z_loss([logits[0]], torch.ones(2, 7)), rel=1e-5)
    noisy = [lg.clone() for lg in logits]
    noisy[1][0, :2] = 100 * torch.randn(2, 4)  # padded tokens' logits change nothing
    torch.testing.assert_close(router_z_loss(noisy, attention_mask=mask, mode=mode), got)
    # its gradient pulls the logits down: d/dl lse^2 = 2 lse softmax(l)
    leaf = logits[0].clone().requires_grad_(True)
    router_z_loss(leaf).backward()
    lse = leaf.detach().logsumexp(-1, keepdim=True)
    torch.testing.assert_close(leaf.grad, 2 * lse * leaf.detach().softmax(-1) / 14)
    with pytest.raises(ValueError, match="mode must be one of"):
        router_z_loss(logits, mode="sum")


def test_z_loss_with_modality_groups_takes_each_tokens_own_group():
    logits = 2 * torch.randn(2, 9, 6)
    modality = (torch.rand(2, 9) > 0.5).long()
    got = router_z_loss(logits, memory_groups=[4, 2], modality_ids=modality)
    own = torch.where(modality.bool().unsqueeze(-1).expand(2, 9, 4), torch.nn.functional.pad(logits[..., 4:], (0, 2),
                      value=-float("inf")), logits[..., :4])  # each token's group logits, -inf padded to 4
    assert got.item() == pytest.approx(hand_z_loss([own], torch.ones(2, 9)), rel=1e-5)
