"""Modality-aware mixture-of-experts feed-forward block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memmix.layers.moe import ModalityMoE

GROUPS = [3, 2]


def make(routing="token_choice", **kw) -> ModalityMoE:
    torch.manual_seed(0)
    return ModalityMoE(8, 16, GROUPS, routing=routing, **kw).double()


def expert(moe, e, x):
    return (F.silu(x @ moe.w_gate[e].t()) * (x @ moe.w_up[e].t())) @ moe.w_down[e].t()


def test_token_choice_matches_a_loop():
    moe = make(topk=2)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    modality = torch.randint(0, 2, (2, 7))
    got = moe(x, modality).hidden_states
    logits = moe.router(x)
    for b in range(2):
        for t in range(7):
            lo, hi = (0, 3) if modality[b, t] == 0 else (3, 5)
            p = logits[b, t, lo:hi].softmax(-1)
            w, i = p.topk(2)
            w = w / w.sum()
            want = sum(w[j] * expert(moe, lo + i[j].item(), x[b, t]) for j in range(2))
            torch.testing.assert_close(got[b, t], want)


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_no_token_reaches_another_groups_expert(routing):
    moe = make(routing)
    moe.train()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    modality = torch.randint(0, 2, (2, 10))
    base = moe(x, modality).hidden_states
    with torch.no_grad():
        moe.w_down[3:] += torch.randn_like(moe.w_down[3:])  # image experts change
    moved = moe(x, modality).hidden_states
    text = modality == 0
    torch.testing.assert_close(moved[text], base[text])
    assert not torch.allclose(moved[~text], base[~text])
    # gradients per group: a loss on text tokens reaches no image expert
    moe.zero_grad()
    moe(x, modality).hidden_states[text].square().sum().backward()
    assert moe.w_up.grad[3:].abs().max() == 0 and moe.w_up.grad[:3].abs().max() > 0


def test_expert_choice_respects_capacity_and_padding():
    moe = make("expert_choice", capacity_factor=0.5)
    moe.train()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    modality = torch.randint(0, 2, (2, 12))
    mask = torch.ones(2, 12)
    mask[0, :4] = 0
    out = moe(x, modality, attention_mask=mask)
    assert out.hidden_states[0, :4].abs().max() == 0
    assert out.aux_router_loss is not None and torch.isfinite(out.aux_router_loss)
    allowed = torch.tensor([0, 0, 0, 1, 1]) == modality.unsqueeze(-1)
    scores = moe.router(x).float().masked_fill(~(allowed & mask.bool().unsqueeze(-1)), float("-inf")).softmax(-1)
    weights = moe._expert_choice_weights(scores.nan_to_num(0.0), allowed & mask.bool().unsqueeze(-1), modality)
    for e, n in enumerate([3, 3, 3, 2, 2]):
        assert int((weights[..., e] > 0).sum()) <= -(-0.5 * 24 // n)
    assert not (weights[0, :4] > 0).any()
    # the auxiliary router's loss trains only the auxiliary router
    moe.zero_grad()
    out.aux_router_loss.backward()
    assert moe.router.weight.grad is None and moe.w_up.grad is None
    assert moe.aux_router[0].weight.grad.abs().max() > 0


def test_expert_choice_inference_is_causal():
    moe = make("expert_choice")
    moe.eval()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    modality = torch.randint(0, 2, (1, 10))
    with torch.no_grad():
        moe.aux_router[2].bias.fill_(0.3)  # so that some experts fire
        base = moe(x, modality).hidden_states
        x2 = x.clone()
        x2[0, 6:] = torch.randn(4, 8, dtype=torch.float64) * 10
        moved = moe(x2, modality).hidden_states
    torch.testing.assert_close(moved[0, :6], base[0, :6])
    assert base.abs().max() > 0
    # expert choice itself (training mode) is not causal: a future token can move an earlier one's experts
    assert moe(x, modality, causal=False).hidden_states.shape == base.shape


@pytest.mark.parametrize("kw, match", [(dict(routing="hash"), "routing"), (dict(topk=3), "topk"),
                                       (dict(capacity_factor=0), "capacity_factor"),
                                       (dict(expert_groups=[2, True]), "expert_groups")])  # a bool is no count
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ModalityMoE(8, 16, **(dict(expert_groups=GROUPS) | kw))
