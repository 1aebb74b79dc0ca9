"""Files: writing results safely (atomic replacement, ordinary permissions, checks before the work starts) and
listing a folder's files.

Every file memmix writes (checkpoints, JSON reports, plots, configs, shards, saved model folders) goes through
`atomic_write`: the bytes land in a temporary file beside the target, are synced, and replace the target in one
`os.replace`, so a crash or a kill never leaves a half-written file. A Ctrl-C that arrives during the write is
held until the file is in place (`interrupts_deferred`): unwinding from inside a writer such as torch.save can
raise a second, unrelated error from its clean-up that hides the interrupt. The result gets the permissions a plain
`open(path, "w")` would give (0666 minus the umask), not the 0600 of a temporary file.

`check_writable(path)` is called before long work (training, a benchmark) so that an unwritable output fails in
the first second, not after the work is done; `check_outputs_apart` refuses an output that is (or holds, or lies
in) an input of the same command; `exclusive_lock` keeps two processes from writing one output at once.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

from memmix.errors import InputError


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
    """Files under a folder (recursively, sorted, hidden ones left out) whose names end with one of `suffixes`."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden: .git, an interrupted prepare's staging
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(suffixes) and not f.startswith(".")]
    return found


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and deliver it, through the handler that was in place,
    when the block ends. A second Ctrl-C is delivered at once (the user insists). Handlers are the main thread's to
    set: in another thread, or where SIGINT is ignored or kills the process outright, the block runs as it is."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    held = []

    def hold(signum, frame):
        if held:
            previous(signum, frame)
        held.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(*held[0])


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Call write(f) on a temporary file beside `path`, sync it, and move it onto `path` (mode 0666 & ~umask).

    The parent folder is created if missing. On any error the temporary file is removed and `path` is untouched.
    A Ctrl-C during the write is delivered once `path` is written (`interrupts_deferred`).
    """
    with interrupts_deferred():
        _atomic_write(path, write, binary)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool) -> None:
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
    """Write `payload` as indented JSON (with a final newline) to `path` atomically. Non-finite floats (a diverged
    loss) are written as null: bare NaN/Infinity is not JSON, and strict parsers reject it."""
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text + "\n"))


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_replace_dir(path: str | os.PathLike, fill: Callable[[str], Any]) -> None:
    """Build a folder with fill(staging_dir) beside `path`, then swap it in for `path` (old content removed).

    A crash or a kill at any moment leaves either the old folder or the complete new one at `path`, never a mix
    (on Linux the two folders trade places in one renameat2(RENAME_EXCHANGE); elsewhere a kill between the two
    renames leaves the old folder under `.NAME.*.old` beside `path`). Every file gets ordinary permissions.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    old = None
    try:
        fill(staging)
        _ordinary_modes(staging)
        if os.path.exists(path) and _exchange(staging, path):
            old = staging  # the old folder now sits at the staging name
        else:
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
                os.rmdir(old)
                os.replace(path, old)
            os.replace(staging, path)
    except BaseException:
        if old is None or old != staging:
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not os.path.exists(path) and os.path.exists(old):
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


def _ordinary_modes(folder: str) -> None:
    """The modes a plain open()/mkdir would give (some writers, e.g. safetensors, create files 0600)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


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


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_outputs_apart(outputs: Mapping[str, tuple[str | None, bool]], inputs: Mapping[str, str | None]) -> None:
    """InputError naming the output flag when an output would overwrite, delete or be read as an input.

    outputs: {flag: (path, replaced_whole)}; inputs: {flag: path}; None or missing paths are skipped. Refused: an
    output equal to an input or inside an input folder, and an output folder that is replaced whole (prepare,
    convert) holding an input. Paths are compared after resolving symbolic links.
    """
    for out_flag, (out_path, replaced_whole) in outputs.items():
        if not out_path:
            continue
        out = os.path.realpath(out_path)
        for in_flag, in_path in inputs.items():
            if not in_path or str(in_path).startswith("hf:") or not os.path.exists(in_path):
                continue
            source = os.path.realpath(in_path)
            if out == source:
                why = "is also"
            elif _inside(out, source):
                why = "lies inside"
            elif replaced_whole and _inside(source, out):
                why = "holds"
            else:
                continue
            raise InputError(f"'{out_path}' {why} the input {in_flag} '{in_path}', which writing it would destroy; "
                             "choose another output path", argument=out_flag)


LOCK_NAME = ".memmix.lock"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, argument: str, is_dir: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on an output for the block: `path/.memmix.lock` for a folder, `.NAME.lock` beside
    a file. A second holder gets InputError (naming `argument` and the holder's process id) at once.

    The lock dies with its process (flock), so a killed run never leaves a stale lock behind.
    """
    import fcntl

    path = os.path.abspath(os.fspath(path))
    if is_dir:
        os.makedirs(path, exist_ok=True)
        lock_path = os.path.join(path, LOCK_NAME)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(f"'{path}' is in use by another memmix process (pid {holder}); wait for it to finish "
                             "or choose another path", argument=argument) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
