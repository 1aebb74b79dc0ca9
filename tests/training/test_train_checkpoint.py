import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from memmix.errors import InputError
from memmix.training import checkpoint as ckpt_mod
from memmix.training.checkpoint import CheckpointDir, load_checkpoint


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "rows_consumed": int(value)}


def test_crash_between_temp_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpts = CheckpointDir(str(tmp_path), keep=2)
    ckpts.save(_state(1.0), step=2)

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(ckpt_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ckpts.save(_state(2.0), step=4)
    monkeypatch.undo()
    assert ckpts.latest() == ckpts.path_for(2) and ckpts.steps() == [2]
    assert load_checkpoint(ckpts.latest())["model"]["w"].tolist() == [1.0] * 4


def test_keeps_the_last_checkpoints_and_follows_the_pointer(tmp_path):
    ckpts = CheckpointDir(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpts.save(_state(float(step)), step=step)
    assert ckpts.steps() == [2, 3] and load_checkpoint(ckpts.latest())["step"] == 3
    os.remove(os.path.join(ckpts.dir, "latest"))
    assert ckpts.latest() == ckpts.path_for(3)


def test_damaged_or_foreign_files_are_input_errors(tmp_path):
    ckpts = CheckpointDir(str(tmp_path))
    path = ckpts.save(_state(1.0), step=1)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match="could not be read"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a memmix training checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_killed_writer_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process in the middle of writing a large checkpoint; the previous one still loads."""
    script = textwrap.dedent(f"""
        import torch
        from memmix.training.checkpoint import CheckpointDir
        ckpts = CheckpointDir({str(tmp_path)!r})
        ckpts.save({{"model": {{"w": torch.ones(4)}}}}, step=1)
        big = {{"model": {{"w": torch.randn(32, 1024, 1024)}}}}  # 128 MB: slow enough to be caught mid-write
        step = 2
        while True:
            ckpts.save(big, step=step)
            step += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.time() + 60
    def writing_step_2():
        names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
        return "latest" in names and any(n.startswith(".step_00000002.pt.") for n in names)  # atomic_write's temporary file

    while time.time() < deadline and not writing_step_2():
        time.sleep(0.005)
    assert writing_step_2(), "the writer never started the second checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = CheckpointDir(str(tmp_path)).latest()
    assert latest is not None
    weights = load_checkpoint(latest)["model"]["w"]  # step 1, or step 2 if it finished before the kill landed
    assert weights.tolist() == [1.0] * 4 if latest.endswith("step_00000001.pt") else weights.shape == (32, 1024, 1024)
