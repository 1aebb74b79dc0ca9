"""Files: writing results safely (atomic replacement, ordinary permissions, checks before the work starts) and
listing a folder's files.

Every file memmix writes (checkpoints, JSON reports, plots, configs, shards, saved model folders) goes through
`atomic_write`: the bytes land in a temporary file beside the target, are synced, and replace the target in one
`os.replace`, so a crash or a kill never leaves a half-written file. The result gets the permissions a plain
`open(path, "w")` would give (0666 minus the umask), not the 0600 of a temporary file.

`check_writable(path)` is called before long work (training, a benchmark) so that an unwritable output fails in
the first second, not after the work is done.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under a folder (recursively, sorted) whose names end with one of `suffixes`."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(suffixes) and not f.startswith(".")]
    return found


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Call write(f) on a temporary file beside `path`, sync it, and move it onto `path` (mode 0666 & ~umask).

    The parent folder is created if missing. On any error the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write `payload` as indented JSON (with a final newline) to `path` atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2) + "\n"))


def atomic_replace_dir(path: str | os.PathLike, fill: Callable[[str], Any]) -> None:
    """Build a folder with fill(staging_dir) beside `path`, then swap it in for `path` (old content removed).

    A crash leaves either the old folder or the new one at `path`, never a mix.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    old = None
    try:
        fill(staging)
        os.chmod(staging, 0o777 & ~_umask())
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not os.path.exists(path) and os.path.exists(old):
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


def check_writable(path: str | os.PathLike, is_dir: bool = False) -> str | None:
    """Why `path` cannot be written (a one-line reason), or None when it can.

    For a file: its folder (or the nearest existing ancestor, which the write would create folders in) must be a
    writable folder, and an existing `path` must not be a folder. For is_dir: `path` itself, if it exists, must be
    a writable folder. Nothing is created.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if is_dir:
            if not os.path.isdir(path):
                return f"'{path}' exists and is not a folder"
            return _probe(path)
        if os.path.isdir(path):
            return f"'{path}' is a folder, not a file"
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor):
        return f"'{ancestor}' is not a folder, so '{path}' cannot be created"
    return _probe(ancestor)


def _probe(folder: str) -> str | None:
    """Create and remove a file in `folder` (the one test that covers permissions, ACLs and read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"folder '{folder}' is not writable ({err.strerror or err})"
    return None
