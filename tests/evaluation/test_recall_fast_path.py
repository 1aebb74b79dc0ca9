"""The recall benchmark's fast path (issue 16): the query-only LM head gives the same numbers; every training
batch has one shape per training set (what a CUDA graph needs); cuda_graph='on' needs CUDA."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from memmix.data.mqar import generate_mqar, query_positions
from memmix.evaluation.recall import RecallSettingError, RecallSettings, run_recall, validate_settings
from memmix.evaluation.recall.training import Recipe, _model_batches


def _accuracies(report) -> list:
    return [(r.model, r.accuracy, r.final_loss) for r in report.results]


def test_query_head_gives_the_full_heads_numbers():
    base = RecallSettings(models=["mom", "linear"], steps=40, num_train=300, num_test=40, workers=1,
                          query_head="off")
    full, query = run_recall(base, progress=False), run_recall(dataclasses.replace(base, query_head="on"),
                                                                  progress=False)
    for (name, acc_a, loss_a), (_, acc_b, loss_b) in zip(_accuracies(full), _accuracies(query)):
        assert acc_a == acc_b, name
        assert loss_b == pytest.approx(loss_a, rel=1e-5)


def test_batches_have_one_shape_per_training_set():
    train = {16: generate_mqar(64, 16, [2, 3], 64, seed=0), 24: generate_mqar(64, 24, [2, 5], 64, seed=1)}
    recipe = Recipe(steps=10, lr=1e-3, weight_decay=0.0, warmup_fraction=0.0, batch_size=8, seed=0, query_head=True)
    shapes = {}
    batches = _model_batches(train, lambda b: {"input_ids": b.input_ids}, recipe)
    for _ in range(20):
        batch = next(batches)
        key = batch["input_ids"].shape[1]
        signature = {name: tuple(t.shape) for name, t in batch.items()}
        assert shapes.setdefault(key, signature) == signature
        labels, positions = batch["labels"], batch["loss_positions"]
        scored = labels.gather(1, positions + 1) != -100
        assert scored.sum(1).tolist() == (labels[:, 1:] != -100).sum(1).tolist()  # every query, nothing else
    assert shapes[16]["loss_positions"] == (8, 3) and shapes[24]["loss_positions"] == (8, 5)


def test_query_positions_lists_the_queries_then_position_zero():
    labels = torch.full((2, 8), -100)
    labels[0, [3, 6]] = 7
    labels[1, 5] = 9
    assert query_positions(labels, 3).tolist() == [[2, 5, 0], [4, 0, 0]]


def test_cuda_graph_on_needs_cuda():
    with pytest.raises(RecallSettingError, match="cuda_graph"):
        validate_settings(RecallSettings(cuda_graph="on", device="cpu"))
    with pytest.raises(RecallSettingError, match="query_head"):
        validate_settings(RecallSettings(query_head="yes"))


def test_bf16_is_on_for_cuda_only_and_on_needs_cuda():
    from memmix.evaluation.recall.settings import fast_path

    assert not fast_path(RecallSettings(device="cpu"), "bf16")  # the CPU (the demo) trains in float32
    assert fast_path(RecallSettings(device="cuda"), "bf16")
    with pytest.raises(RecallSettingError, match="bf16"):
        validate_settings(RecallSettings(bf16="on", device="cpu"))
    with pytest.raises(RecallSettingError, match="bf16"):
        validate_settings(RecallSettings(bf16="fp16"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_graphed_recall_run_equals_the_eager_one():
    base = RecallSettings(models=["mom", "gdn", "linear", "attention", "bmojo"], steps=60, num_train=500,
                          num_test=60, workers=1, device="cuda", cuda_graph="off")
    eager, graphed = run_recall(base, progress=False), run_recall(dataclasses.replace(base, cuda_graph="on"),
                                                                   progress=False)
    for (name, acc_a, loss_a), (_, acc_b, loss_b) in zip(_accuracies(eager), _accuracies(graphed)):
        assert loss_b == pytest.approx(loss_a, rel=1e-4), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_recall_run_tracks_the_float32_one():
    base = RecallSettings(models=["mom", "gdn"], steps=60, num_train=500, num_test=60, workers=1, device="cuda",
                          bf16="off")
    fp32, bf16 = run_recall(base, progress=False), run_recall(dataclasses.replace(base, bf16="on"), progress=False)
    for (name, _, loss_a), (_, _, loss_b) in zip(_accuracies(fp32), _accuracies(bf16)):
        assert loss_b == pytest.approx(loss_a, rel=5e-2), name
