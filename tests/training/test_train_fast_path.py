"""memmix train's fast path: the fused LM loss, padded document bounds, and the CUDA-graph option's checks."""
import pytest
import torch
from training_helpers import tiny_train_config

from memmix.errors import InputError
from memmix.data.packing import pad_bounds
from memmix.models.loss import next_token_targets
from memmix.training.metrics import read_metrics
from memmix.training.trainer import train


def _losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(str(out_dir)) if r.get("kind") == "train"]


def test_pad_bounds_adds_empty_documents_to_a_power_of_two():
    cu = torch.tensor([0, 3, 7, 16])
    assert pad_bounds(cu).tolist() == [0, 3, 7, 16, 16, 16, 16, 16]
    assert pad_bounds(torch.arange(10)).numel() == 16
    assert pad_bounds(torch.arange(5), 9).numel() == pad_bounds(torch.arange(9), 9).numel() == 16  # one step's
    labels = torch.randint(0, 9, (1, 16))
    assert torch.equal(next_token_targets(labels, cu_seqlens=pad_bounds(cu)), next_token_targets(labels, cu_seqlens=cu))


def test_fused_loss_trains_as_the_plain_loss(tmp_path, corpus_path):
    runs = {}
    for mode in ("off", "on"):
        train(tiny_train_config(corpus_path, tmp_path / mode, model="mom-tiny", max_steps=4, fused_loss=mode))
        runs[mode] = _losses(tmp_path / mode)
    assert len(runs["on"]) == 4
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-5)


def test_cuda_graph_needs_one_cuda_device(tmp_path, corpus_path):
    with pytest.raises(InputError, match="cuda_graph: needs one CUDA device"):
        train(tiny_train_config(corpus_path, tmp_path / "a", cuda_graph=True))
    with pytest.raises(InputError, match="cuda_graph: captures one process's step"):
        train(tiny_train_config(corpus_path, tmp_path / "b", cuda_graph=True, parallel="ddp"))
    with pytest.raises(InputError, match="fused_loss: must be one of auto, on, off"):
        tiny_train_config(corpus_path, tmp_path / "c", fused_loss="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_loss_curve_matches_the_plain_one_on_the_gpu(tmp_path, corpus_path):
    """100 steps of a small preset in bf16: fused loss (the default on CUDA) and the CUDA graph against the plain
    path; within bf16 noise (the kernels' order of summation differs)."""
    runs = {}
    for name, options in {"plain": dict(fused_loss="off"), "fused": dict(fused_loss="on"),
                          "graph": dict(fused_loss="on", cuda_graph=True)}.items():
        train(tiny_train_config(corpus_path, tmp_path / name, model="mom-tiny", max_steps=100, device="cuda",
                          save_every=1000, **options))
        runs[name] = _losses(tmp_path / name)
    for name in ("fused", "graph"):
        assert runs[name][:10] == pytest.approx(runs["plain"][:10], rel=2e-2), name
        assert abs(sum(runs[name][-10:]) - sum(runs["plain"][-10:])) / 10 < 0.05 * abs(sum(runs["plain"][-10:]) / 10)
