"""Run logs: JSON lines (always), TensorBoard (when installed), and the loss curve (loss.png). Rank 0 only."""
from __future__ import annotations

import json
import os
import sys

from memmix.files import atomic_write, atomic_write_text


class MetricsLog:
    """Appends one JSON object per event to `<out_dir>/metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str, tensorboard: bool = True, resume_step: int | None = None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = _tensorboard_writer(os.path.join(out_dir, "tensorboard")) if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint; drop their old lines so each step appears once."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
        atomic_write_text(self.path, "".join(kept))

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.tb.add_scalar(f"{kind}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("memmix train: tensorboard is not installed, logging to metrics.jsonl only "
              "(pip install tensorboard to enable)", file=sys.stderr)
        return None
    return SummaryWriter(path)


def read_metrics(out_dir: str, kind: str = "train") -> list[dict]:
    """The records of one kind from a run's metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("kind", "train") == kind]


def write_loss_plot(out_dir: str) -> str | None:
    """Draw the training loss (and validation loss, if any) against the step into `out_dir/loss.png`.

    Returns the path, or None when matplotlib is not installed (said in one line)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("memmix train: matplotlib is not installed, so there is no loss.png (pip install matplotlib)",
              file=sys.stderr)
        return None
    train, val = read_metrics(out_dir, "train"), read_metrics(out_dir, "val")
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "loss.png")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    return path
