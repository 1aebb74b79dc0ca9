"""Run logs: JSON lines (always), TensorBoard (when installed), and the progress bar. Rank 0 only."""
from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm

from memmix.files import atomic_write_text


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


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """Steps bar; tqdm's ETA covers the remaining steps, loss and tokens/s go in the postfix."""
    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True,
                desc="train", file=sys.stderr)
