"""The training stack with the real MoM model (tiny shapes)."""
import json

import numpy as np
import pytest
import torch
from training_helpers import TINY_MOM, dist_run_config, run_torchrun, tiny_train_config

from memmix.data.packing import pack_rows
from memmix.training.metrics import read_metrics
from memmix.models.presets import build_model
from memmix.training.trainer import train


def test_packed_loss_equals_per_document_losses():
    """The packing contract: one row with cu_seqlens == the documents run on their own (token-weighted)."""
    torch.manual_seed(0)
    model = build_model("tiny", 64, TINY_MOM).eval()  # eval: no aux loss, so the CE alone is compared
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 64, size=12), np.array([5])), (rng.integers(0, 64, size=12), np.array([], dtype=np.int64))]
    input_ids, cu_seqlens = pack_rows(rows)
    with torch.no_grad():
        packed = model(input_ids=input_ids, cu_seqlens=cu_seqlens, labels=input_ids, use_cache=False).loss
        total, count = 0.0, 0
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            doc = input_ids[:, start:end]
            total += model(input_ids=doc, labels=doc, use_cache=False).loss.item() * (end - start - 1)
            count += end - start - 1
    assert packed.item() == pytest.approx(total / count, rel=1e-5)


def test_mom_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, corpus_path):
    cfg = dict(model="tiny", model_overrides=TINY_MOM, max_steps=4, grad_accum=1, save_every=2)
    train(tiny_train_config(corpus_path, tmp_path / "full", **cfg))

    def die_at_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_train_config(corpus_path, tmp_path / "cut", **cfg), step_callback=die_at_3)
    # a resume may change how the model runs (impl, low_memory), not what it is
    runtime = dict(cfg, model_overrides=dict(TINY_MOM, impl="chunk", low_memory=True))
    train(tiny_train_config(corpus_path, tmp_path / "cut", **runtime, resume=True))
    curve = lambda d: [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(str(d))]  # noqa: E731
    assert curve(tmp_path / "cut") == curve(tmp_path / "full") and len(curve(tmp_path / "full")) == 4


@pytest.mark.filterwarnings("error::FutureWarning")  # no deprecated checkpointing API on newer transformers
def test_gradient_checkpointing_run_matches_a_plain_run(tmp_path, corpus_path, monkeypatch):
    from memmix.models.modeling_mom import MoMModel

    calls = []
    original = MoMModel._checkpointed

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(MoMModel, "_checkpointed", counting)
    cfg = dict(model="tiny", model_overrides=TINY_MOM, max_steps=3, grad_accum=1, save_every=3)
    curves = {}
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        train(tiny_train_config(corpus_path, out, gradient_checkpointing=checkpointing, **cfg))
        assert bool(calls) == checkpointing  # blocks ran under activation checkpointing only when asked
        curves[checkpointing] = [v for r in read_metrics(str(out)) for v in (r["loss"], r["grad_norm"])]
    assert len(curves[True]) == 2 * 3
    assert curves[True] == pytest.approx(curves[False], rel=1e-5)


@pytest.mark.slow
def test_mom_ddp_and_fsdp_match_single_process(tmp_path, corpus_path):
    train(dist_run_config(corpus_path, str(tmp_path / "none"), "tiny", TINY_MOM, "none", 1))
    run_torchrun([corpus_path, str(tmp_path), "tiny", json.dumps(TINY_MOM), "ddp,fsdp"])
    single = [r["loss"] for r in read_metrics(str(tmp_path / "none"))]
    for mode in ("ddp", "fsdp"):
        assert [r["loss"] for r in read_metrics(str(tmp_path / mode))] == pytest.approx(single, rel=1e-4), mode
