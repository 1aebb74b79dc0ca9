import subprocess
import sys

import pytest
import torch
from training_helpers import tiny_train_config

from memmix.cli import main
from memmix.training.checkpoint import CheckpointDir, load_checkpoint
from memmix.training.metrics import read_metrics
from memmix.training.trainer import train


class _Killed(Exception):
    pass


def _interrupt_at(step_to_die: int):
    def callback(step, loss):
        if step == step_to_die:
            raise _Killed

    return callback


def _curve(out_dir):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(str(out_dir))]


def test_training_reduces_the_loss(tmp_path, corpus_path):
    result = train(tiny_train_config(corpus_path, tmp_path / "run", max_steps=12, lr=1e-2, grad_accum=1))
    losses = [loss for _, loss, _, _ in _curve(tmp_path / "run")]
    assert len(losses) == 12 and result["step"] == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert CheckpointDir(str(tmp_path / "run")).steps() == [10, 12]


def test_resume_after_a_kill_matches_an_uninterrupted_run_exactly(tmp_path, corpus_path):
    train(tiny_train_config(corpus_path, tmp_path / "full"))
    with pytest.raises(_Killed):  # dies after step 5; the last checkpoint is step 4
        train(tiny_train_config(corpus_path, tmp_path / "killed"), step_callback=_interrupt_at(5))
    assert CheckpointDir(str(tmp_path / "killed")).steps() == [2, 4]
    train(tiny_train_config(corpus_path, tmp_path / "killed", resume=True))
    assert _curve(tmp_path / "killed") == _curve(tmp_path / "full")  # bitwise: same floats, each step once
    full = load_checkpoint(CheckpointDir(str(tmp_path / "full")).latest())
    resumed = load_checkpoint(CheckpointDir(str(tmp_path / "killed")).latest())
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert resumed["rows_consumed"] == full["rows_consumed"] == 6 * 4


def test_validation_loss_is_logged_and_repeatable(tmp_path, corpus_path):
    held_out = tmp_path / "val.txt"
    held_out.write_text("the birds sang songs of memory in the park " * 8)
    for name in ("a", "b"):
        train(tiny_train_config(corpus_path, tmp_path / name, val_data=str(held_out), eval_every=3, eval_batches=2))
    val = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "a"), kind="val")]
    assert [s for s, _ in val] == [3, 6] and val == [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "b"), kind="val")]
    assert val[1][1] < val[0][1]


def test_resume_on_another_batch_layout_continues_the_data_stream(tmp_path, corpus_path):
    """A checkpoint from grad_accum=2 resumes with micro_batch 4 x accum 1: same rows per step, same data."""
    train(tiny_train_config(corpus_path, tmp_path / "a", max_steps=4))
    train(tiny_train_config(corpus_path, tmp_path / "a", max_steps=6, resume=True, micro_batch_size=4, grad_accum=1))
    assert load_checkpoint(CheckpointDir(str(tmp_path / "a")).latest())["rows_consumed"] == 24


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_input_errors_are_one_line_and_keep_existing_runs(tmp_path, corpus_path, capsys, standin):
    run = str(tmp_path / "run")
    base = ["train", "--model", standin, "--data", corpus_path, "--seq-len", "16", "--micro-batch-size", "2",
            "--max-steps", "2", "--save-every", "2", "--out-dir", run, "--no-progress", "--no-tensorboard",
            "--no-save-hf"]
    assert main(base) == 0
    capsys.readouterr()
    before = open(CheckpointDir(run).latest(), "rb").read()

    assert "already holds a run" in _error_line(capsys, base)
    assert "another configuration" in _error_line(capsys, base + ["--resume", "--model-overrides", '{"dim": 8}'])
    assert "does not exist" in _error_line(capsys, base[:4] + [str(tmp_path / "nope")] + base[5:] + ["--overwrite"])
    assert "unknown model preset 'mom-999m'" in _error_line(capsys, ["train", "--model", "mom-999m", "--data", corpus_path])
    assert "smaller than the vocabulary" in _error_line(
        capsys, base + ["--overwrite", "--vocab-size", "100", "--out-dir", str(tmp_path / "other")])
    assert "no checkpoint" in _error_line(capsys, base + ["--resume", "--out-dir", str(tmp_path / "fresh")])
    assert open(CheckpointDir(run).latest(), "rb").read() == before  # nothing already written was lost


def test_damaged_checkpoint_on_resume(tmp_path, corpus_path, capsys, standin):
    train(tiny_train_config(corpus_path, tmp_path / "run", max_steps=2))
    latest = CheckpointDir(str(tmp_path / "run")).latest()
    with open(latest, "r+b") as f:
        f.truncate(64)
    line = _error_line(capsys, ["train", "--model", standin, "--data", corpus_path, "--out-dir",
                                str(tmp_path / "run"), "--resume", "--seq-len", "16"])
    assert "could not be read" in line and "step_00000002.pt" in line


def test_command_line_errors_have_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memmix.cli", "train", "--data", str(tmp_path / "missing.txt"),
                           "--out-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "missing.txt' does not exist" in proc.stderr
