"""Helpers of the `memmix` command's tests (test_cli.py, test_reliability.py): a command run in this process, the
arguments of tiny runs, a trained tiny model. Importing it puts tests/training on sys.path (training_helpers)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "training"))

from training_helpers import register_standin, train_tiny_mom  # noqa: E402

from memmix.cli import main  # noqa: E402

PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECALL_TINY = ["--models", "linear", "--seq-len", "16", "--num-kv-pairs", "2", "--d-model", "16", "--layers", "1",
               "--head-dim", "8", "--steps", "2", "--batch-size", "4", "--vocab-size", "16", "--num-train", "8",
               "--num-test", "4", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(out_dir of a 4-step tiny MoM run with checkpoints and final/, held-out text); one per test module."""
    return train_tiny_mom(tmp_path_factory.mktemp("cli_run"))


def memmix_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `memmix argv`; arguments that are paths or numbers become strings."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def cli_error(capsys, argv, status: int = 2) -> str:
    """The one stderr line of a failing command."""
    code, _, err = memmix_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == status and len(lines) == 1, (code, err)
    assert "Traceback" not in err
    return lines[0]


def standin_train_argv(corpus, out_dir, *extra: str) -> list[str]:
    """`memmix train` of a 2-step stand-in run on `corpus` into `out_dir`, `extra` appended."""
    return ["train", "--model", register_standin(), "--data", corpus, "--seq-len", "16", "--micro-batch-size", "2",
            "--max-steps", "2", "--save-every", "2", "--warmup-steps", "1", "--lr", "3e-3", "--log-every", "1",
            "--out-dir", str(out_dir), "--no-progress", "--no-tensorboard", "--no-save-hf", "--no-plot", *extra]


def must_not_start(*args, **kwargs):
    """Stands in for the work of a command whose arguments are bad."""
    raise AssertionError("the work started although an argument was bad")


def folder_files(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), the lock file left out."""
    return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(folder) for f in files if f != ".memmix.lock"}
