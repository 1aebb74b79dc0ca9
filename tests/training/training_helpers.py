"""Helpers shared by tests/training and tests/evaluation (a plain module, so both can import it)."""
from __future__ import annotations

import json
import random

import standin_model

from memmix.training.config import TrainConfig

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of memory".split()

# a MoM small enough for CPU tests: 2 layers of 2 heads x 16, 4 memories, top-2, shared memory
TINY_MOM = {"hidden_size": 32, "num_heads": 2, "head_dim": 16, "intermediate_size": 64}


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
    values = dict(model=standin_model.register(), data=data, seq_len=16, micro_batch_size=2, grad_accum=2,
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
