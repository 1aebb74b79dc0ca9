import shutil

import pytest
from training_helpers import dist_run_config, run_torchrun

from memmix.training.metrics import read_metrics
from memmix.training.trainer import train


def _losses(out_dir):
    return [r["loss"] for r in read_metrics(str(out_dir))]


def test_ddp_and_fsdp_on_two_processes_match_single_process_training(tmp_path, corpus_path, standin):
    """2 ranks x grad_accum 1 == 1 rank x grad_accum 2 (same rows per step, same averaged gradients).
    Checkpoints hold full state dicts, so they move between world sizes: a 1-process checkpoint resumes under
    2-rank FSDP, and a 2-rank FSDP checkpoint resumes in 1 process, both exactly like a 1-process resume."""
    train(dist_run_config(corpus_path, str(tmp_path / "none"), standin, {}, "none", 1))
    shutil.copytree(tmp_path / "none", tmp_path / "fsdp_resume")
    run_torchrun([corpus_path, str(tmp_path), standin, "{}", "ddp,fsdp,fsdp@resume"])
    single = _losses(tmp_path / "none")
    assert len(single) == 4
    for mode in ("ddp", "fsdp"):
        assert _losses(tmp_path / mode) == pytest.approx(single, rel=1e-5, abs=1e-6), mode
        start = read_metrics(str(tmp_path / mode), kind="start")[0]
        assert (start["world_size"], start["parallel"]) == (2, mode)

    for name in ("none", "fsdp"):  # continue to step 6 in one process
        resumed = dist_run_config(corpus_path, str(tmp_path / name), standin, {}, "none", 1)
        resumed.max_steps, resumed.overwrite, resumed.resume = 6, False, True
        train(resumed)
    reference = _losses(tmp_path / "none")
    assert len(reference) == 6
    assert _losses(tmp_path / "fsdp") == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert _losses(tmp_path / "fsdp_resume") == pytest.approx(reference, rel=1e-5, abs=1e-6)
