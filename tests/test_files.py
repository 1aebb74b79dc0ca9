import json
import os
import signal
import stat

import pytest

from memmix.files import atomic_replace_dir, atomic_write, atomic_write_json, check_writable


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "sub" / "out.json", {"a": 1})
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "sub" / "out.json").read_text()) == {"a": 1}
    assert _mode(tmp_path / "sub" / "out.json") == 0o644  # not the 0600 of a temporary file


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def broken(f):
        f.write("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_a_write_arrives_after_the_file_is_complete(tmp_path):
    """The CI failure this guards: Ctrl-C inside torch.save unwound into its zip writer, whose clean-up raised
    'unexpected pos 64 vs 0', hiding the interrupt behind a traceback."""
    import torch

    target = tmp_path / "ckpt.pt"

    def write(f):
        torch.save({"a": torch.zeros(3)}, f)
        _ctrl_c()
        f.write(b"")  # the write goes on after the signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(target, write, binary=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(target)["a"].tolist() == [0, 0, 0]
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_second_ctrl_c_during_a_write_stops_it_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def write(f):
        f.write("new")
        _ctrl_c()
        _ctrl_c()
        raise AssertionError("the second Ctrl-C did not stop the write")

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(target, write)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_replace_dir_swaps_the_whole_folder(tmp_path):
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "stale.bin").write_text("x")
    atomic_replace_dir(folder, lambda d: open(os.path.join(d, "new.json"), "w").write("{}"))
    assert sorted(os.listdir(folder)) == ["new.json"]
    assert sorted(os.listdir(tmp_path)) == ["final"]

    def broken(d):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        atomic_replace_dir(folder, broken)
    assert sorted(os.listdir(folder)) == ["new.json"]
    assert sorted(os.listdir(tmp_path)) == ["final"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_names_the_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "not writable" in check_writable(ro / "out.png")
        assert "not writable" in check_writable(ro / "new" / "deeper" / "out.png")
        assert "not writable" in check_writable(ro, is_dir=True)
    finally:
        ro.chmod(0o755)


def test_check_writable_accepts_new_paths_and_rejects_kinds(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "out.json") is None
    assert check_writable(tmp_path, is_dir=True) is None
    (tmp_path / "file").write_text("")
    assert "not a folder" in check_writable(tmp_path / "file", is_dir=True)
    assert "cannot be created" in check_writable(tmp_path / "file" / "out.json")
    assert "is a folder" in check_writable(tmp_path)
