import math

import pytest
import torch
from torch import nn

from memmix.training.optim import build_optimizer, cosine_schedule, split_decay_groups


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.A_log = nn.Parameter(torch.zeros(3))
        self.conv = nn.Parameter(torch.zeros(6, 1, 4))
        self.flagged = nn.Parameter(torch.zeros(3, 3))
        self.flagged._no_weight_decay = True
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: must appear once
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_decay_groups():
    model = _Toy()
    decay, no_decay = split_decay_groups(model)
    assert _names(model, decay) == ["conv", "proj.weight"]
    assert _names(model, no_decay) == ["A_log", "embed.weight", "flagged", "norm.bias", "norm.weight", "proj.bias"]
    decay, _ = split_decay_groups(model, decay_embeddings=True)
    assert "embed.weight" in _names(model, decay)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_only_matrices_shrink_under_weight_decay():
    model = _Toy()
    for p in model.parameters():
        nn.init.constant_(p, 1.0)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    assert torch.allclose(model.proj.weight, torch.full_like(model.proj.weight, 1 - 0.1 * 0.5))
    assert torch.equal(model.A_log, torch.ones(3)) and torch.equal(model.norm.weight, torch.ones(6))


def test_cosine_schedule_shape():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_schedule(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(18):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.0 * (i + 1) / 5 for i in range(4)])
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[9] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lrs[14:] == pytest.approx([0.2] * 4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize("kwargs, match", [({"warmup_steps": -1}, "warmup_steps"), ({"total_steps": 0}, "total_steps"),
                                           ({"min_lr_ratio": 1.5}, "min_lr_ratio")])
def test_schedule_rejects_bad_arguments(kwargs, match):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    args = dict(warmup_steps=1, total_steps=10, min_lr_ratio=0.1, **{}) | kwargs
    with pytest.raises(ValueError, match=match):
        cosine_schedule(opt, **args)
