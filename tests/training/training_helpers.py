"""Helpers shared by tests/training, tests/evaluation and the CLI tests (a plain module, so all can import it): a
stand-in model, a corpus, tiny training runs and torchrun."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from memmix.models.presets import CUSTOM_MODELS
from memmix.training.config import TrainConfig

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of memory".split()

# a MoM small enough for CPU tests: 2 layers of 2 heads x 16, 4 memories, top-2, shared memory
TINY_MOM = {"hidden_size": 32, "num_heads": 2, "head_dim": 16, "intermediate_size": 64}

STANDIN_NAME = "standin"
DIST_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")


# ----------------------------------------------------------------------------------------------- the stand-in model
# A tiny causal LM with the MoM model's interface, for testing the training infrastructure quickly.
# forward(input_ids (1, T) or (B, T), cu_seqlens (N+1,) | None, labels | None) -> .loss (CE within documents + a small
# auxiliary term, like MoM's load-balancing loss) and .logits (B, T, V). Each block mixes in the running mean of
# earlier positions of the same document, so a wrong `cu_seqlens` changes the result.


def segment_ids(cu_seqlens: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """(T,) document index of every position (all zeros without cu_seqlens)."""
    if cu_seqlens is None:
        return torch.zeros(length, dtype=torch.long, device=device)
    return torch.searchsorted(cu_seqlens[1:], torch.arange(length, device=device), right=True)


class StandInBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)  # (B, T, D)
        total = x.cumsum(1)
        starts = torch.searchsorted(seg, seg)  # (T,) first position of each position's document
        before = torch.where((starts > 0)[None, :, None], total[:, (starts - 1).clamp(min=0)], torch.zeros_like(total))
        count = (torch.arange(seg.numel(), device=h.device) - starts + 1).to(h.dtype)[None, :, None]
        mean = (total - before) / count  # running mean within the document
        return h + self.mix(mean) + self.mlp(torch.tanh(x))


class StandInLM(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(StandInBlock(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.config = SimpleNamespace(vocab_size=vocab_size)

    def forward(self, input_ids, attention_mask=None, cu_seqlens=None, labels=None, **kwargs):
        h = self.embed(input_ids)  # (B, T, D)
        seg = segment_ids(cu_seqlens, input_ids.shape[1], input_ids.device)
        for block in self.layers:
            h = block(h, seg)
        logits = self.lm_head(self.norm(h))  # (B, T, V)
        loss = None
        if labels is not None:
            same_doc = seg[1:] == seg[:-1]  # (T-1,) never predict across a boundary
            ce = F.cross_entropy(logits[:, :-1][:, same_doc].flatten(0, 1).float(),
                                 labels[:, 1:][:, same_doc].flatten())
            loss = ce + 1e-3 * h.pow(2).mean()
        return SimpleNamespace(loss=loss, logits=logits)


def register_standin() -> str:
    """Make StandInLM a model that `memmix train --model` builds; its name."""
    CUSTOM_MODELS[STANDIN_NAME] = lambda vocab_size, overrides: StandInLM(vocab_size, **overrides)
    return STANDIN_NAME


# ----------------------------------------------------------------------------------------------- data and runs


def write_corpus(path, num_docs: int = 40, seed: int = 0) -> str:
    """A JSONL file of short random sentences, one document per line."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))}) + "\n")
    return str(path)


def tiny_train_config(data: str, out_dir, **overrides) -> TrainConfig:
    """A 6-step stand-in run on CPU (no progress bar, TensorBoard, loss plot or HF export); `overrides` replace
    fields."""
    values = dict(model=register_standin(), data=data, seq_len=16, micro_batch_size=2, grad_accum=2,
                  max_steps=6, warmup_steps=1, lr=3e-3, log_every=1, save_every=2, out_dir=str(out_dir),
                  progress=False, tensorboard=False, plot=False, save_hf=False, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def train_tiny_mom(root) -> tuple[str, str]:
    """A 4-step tiny MoM run under `root`: (out_dir, held-out text path). Holds checkpoints and the saved `final/`."""
    from memmix.training.trainer import train

    data = write_corpus(root / "train.jsonl")
    held_out = root / "held_out.txt"
    held_out.write_text("the dogs sang in the park while a cat sat on the mat\n" * 3)
    train(TrainConfig(model="tiny", model_overrides=TINY_MOM, data=data, seq_len=32, micro_batch_size=2, max_steps=4,
                      warmup_steps=1, lr=3e-3, log_every=1, save_every=4, out_dir=str(root / "run"), progress=False,
                      tensorboard=False, plot=False, device="cpu"))
    return str(root / "run"), str(held_out)


# ----------------------------------------------------------------------------------------------- distributed


def dist_run_config(data: str, out_dir: str, model: str, overrides: dict, parallel: str,
                    world_size: int) -> TrainConfig:
    """The 4-step run of the distributed tests; the global batch (world_size * grad_accum * micro_batch rows) stays
    the single-process run's."""
    return TrainConfig(model=model, model_overrides=overrides, data=data, seq_len=16, micro_batch_size=2,
                       grad_accum=2 // world_size, max_steps=4, warmup_steps=1, lr=3e-3, log_every=1, save_every=2,
                       out_dir=out_dir, overwrite=True, parallel=parallel, progress=False, tensorboard=False,
                       plot=False, save_hf=False, device="cpu")


def run_torchrun(args: list[str], nproc: int = 2) -> None:
    """Run dist_worker.py `args` in `nproc` CPU processes under torchrun; fails the test if it fails."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--standalone", f"--nproc_per_node={nproc}", DIST_WORKER, *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
