"""Training checkpoints: written atomically, loadable on any world size.

A checkpoint is one `torch.save` file `out_dir/checkpoints/step_XXXXXXXX.pt` holding full (unsharded)
model and optimiser state dicts keyed by parameter name, the scheduler, the data position
(`rows_consumed`), RNG states and the configs. Each file is written under a temporary name, fsync'ed
and renamed; the pointer file `latest` is updated the same way afterwards. A crash at any moment leaves
the previous checkpoint and pointer intact.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from memmix.errors import InputError
from memmix.files import atomic_write, atomic_write_text  # noqa: F401  (atomic_write_text: re-exported)

FORMAT = "memmix-train-checkpoint"
FORMAT_VERSION = 1
# what a resume takes from a checkpoint (memmix train writes them all); a model is rebuilt from MODEL_KEYS
RESUME_KEYS = ("step", "model_spec", "model", "optimizer", "scheduler", "rng", "rows_consumed", "tokens_seen")
MODEL_KEYS = ("model_spec", "model")
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def atomic_save(obj, path: str) -> None:
    """torch.save to `path` atomically (memmix.files.atomic_write: never a half-written `path`)."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_model_state(model: torch.nn.Module) -> dict:
    """Unsharded state dict on CPU (complete on rank 0 under FSDP; collective: call on every rank)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimiser state keyed by parameter name (collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_training_state(model, optimizer, checkpoint: dict) -> None:
    """Put a checkpoint's full model/optimiser state into a (possibly DDP/FSDP-wrapped) model, on every rank."""
    check_state_dict_shapes(model, checkpoint["model"], checkpoint.get("path", "checkpoint"))
    set_model_state_dict(model, checkpoint["model"], options=StateDictOptions(full_state_dict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True))


def check_state_dict_shapes(model: torch.nn.Module, state: dict, source: str) -> None:
    """InputError naming the first mismatching parameter, before torch raises a long one."""
    own = {name: tuple(p.shape) for name, p in get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)).items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [n for n in own if n in state and tuple(state[n].shape) != own[n]]
    if missing or unexpected or bad:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else
                f"'{bad[0]}' is {tuple(state[bad[0]].shape)} there but {own[bad[0]]} here")
        raise InputError(f"{source} does not fit this model ({what}); use the same --model and --model-overrides "
                         "it was trained with")


class CheckpointDir:
    """The checkpoints of one run: `<out_dir>/checkpoints/step_XXXXXXXX.pt` plus a `latest` pointer."""

    def __init__(self, out_dir: str, keep: int = 2):
        self.dir = os.path.join(out_dir, "checkpoints")
        self.keep = keep

    def steps(self) -> list[int]:
        if not os.path.isdir(self.dir):
            return []
        return sorted(int(m.group(1)) for f in os.listdir(self.dir) if (m := _STEP_FILE.match(f)))

    def path_for(self, step: int) -> str:
        return os.path.join(self.dir, f"step_{step:08d}.pt")

    def latest(self) -> str | None:
        """The checkpoint the `latest` pointer names, else the highest-numbered one, else None."""
        pointer = os.path.join(self.dir, "latest")
        try:  # a damaged pointer (not text, a folder, another name) is ignored: the step files say the same
            with open(pointer, encoding="utf-8") as f:
                name = f.read(256).strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _STEP_FILE.match(name) and os.path.isfile(os.path.join(self.dir, name)):
            return os.path.join(self.dir, name)
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    def save(self, state: dict, step: int) -> str:
        os.makedirs(self.dir, exist_ok=True)
        path = self.path_for(step)
        atomic_save(dict(state, format=FORMAT, format_version=FORMAT_VERSION, step=step), path)
        pointer = os.path.join(self.dir, "latest")
        if os.path.isdir(pointer) and not os.path.islink(pointer):  # a damaged pointer: only ours to replace
            shutil.rmtree(pointer)
        atomic_write_text(pointer, os.path.basename(path) + "\n")
        for old in self.steps()[: -self.keep]:
            if old != step:
                os.remove(self.path_for(old))
        return path


def load_checkpoint(path: str, argument: str | None = None, needs: tuple[str, ...] = ("model",)) -> dict:
    """A training checkpoint as a dict (tensors on CPU); InputError (naming `argument`, the caller's argument that
    gave the path) if it is missing, damaged (the message names the next older checkpoint), not one, or without
    one of the keys the caller `needs` (RESUME_KEYS, MODEL_KEYS)."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint '{path}' does not exist; pass a step_*.pt file or a run's out_dir", argument)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated / not a torch file
        older = older_checkpoints(path)
        hint = f"pass an older one: {older[-1]}" if older else "no older checkpoint sits next to it"
        raise InputError(f"checkpoint '{path}' could not be read ({type(exc).__name__}); it is damaged or not a "
                         f"checkpoint: {hint}", argument) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise InputError(f"'{path}' is not a memmix training checkpoint; pass a step_*.pt file from `memmix train`",
                         argument)
    missing = [key for key in needs if key not in checkpoint]
    if missing:
        raise InputError(f"checkpoint '{path}' is incomplete (no {', '.join(missing[:3])}); pass a step_*.pt file "
                         "that `memmix train` wrote", argument)
    checkpoint["path"] = path
    return checkpoint


def older_checkpoints(path: str) -> list[str]:
    """The step_*.pt files beside `path` with a lower step, oldest first."""
    match = _STEP_FILE.match(os.path.basename(path))
    if not match:
        return []
    folder = CheckpointDir(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    return [folder.path_for(step) for step in folder.steps() if step < int(match.group(1))]


def resolve_checkpoint(path: str, argument: str | None = None) -> str:
    """A checkpoint file, or a run folder / checkpoints folder -> its latest checkpoint."""
    if os.path.isdir(path):
        for out_dir in (path, os.path.dirname(os.path.normpath(path))):
            latest = CheckpointDir(out_dir).latest()
            if latest:
                return latest
        raise InputError(f"no checkpoints under '{path}'; pass a step_*.pt file or the out_dir of a run", argument)
    return path
