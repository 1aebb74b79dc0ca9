import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

from train_helpers import TINY_MOM, write_corpus  # noqa: E402

from memmix.training.config import TrainConfig  # noqa: E402
from memmix.training.trainer import train  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A 4-step tiny MoM run: (out_dir, held-out text path). Holds checkpoints and the saved `final/` folder."""
    root = tmp_path_factory.mktemp("mom_run")
    data = write_corpus(root / "train.jsonl")
    held_out = root / "held_out.txt"
    held_out.write_text("the dogs sang in the park while a cat sat on the mat\n" * 3)
    cfg = TrainConfig(model="tiny", model_overrides=TINY_MOM, data=data, seq_len=32, micro_batch_size=2, max_steps=4,
                      warmup_steps=1, lr=3e-3, log_every=1, save_every=4, out_dir=str(root / "run"), progress=False,
                      tensorboard=False, device="cpu")
    train(cfg)
    return str(root / "run"), str(held_out)
