"""The recall tasks behind one interface (RecallTask): MQAR (memmix.data.mqar) here, mixed-modal recall (MixedTask) in
memmix.evaluation.recall.mixed.

A task makes its splits (train: training sets by key, each batch of one shape; valid and test: data per
(seq_len, num_kv_pairs)), turns a batch into model inputs, and scores a model on a data set:

    task = MQARTask(settings)
    splits = task.splits(device)                  # generated once per process, kept on the device
    loss = model(**task.inputs(batch), labels=batch.labels).loss
    task.accuracy(model, splits.test[(64, 4)])    # fraction of queries answered
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from memmix.data.mqar import MQARData, make_mqar_grid_splits, query_positions
from memmix.evaluation.recall.settings import fast_path, settings_grid, trained_settings, training_sets
from memmix.labels import IGNORE_INDEX


@dataclass
class Splits:
    """train: key -> data set (key: seq_len or (seq_len, num_kv_pairs)); valid, test: (seq_len, N) -> data set."""

    train: dict
    test: dict[tuple[int, int], Any]
    valid: dict[tuple[int, int], Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> Splits:
        def move(d: dict) -> dict:
            return {k: v.to(device) for k, v in d.items()}
        return Splits(move(self.train), move(self.test), move(self.valid))


class RecallTask(Protocol):
    """What the training loop and the runner need from a task."""

    def splits(self, device: str | torch.device) -> Splits: ...

    def inputs(self, batch: Any) -> dict[str, torch.Tensor]: ...

    def accuracy(self, model: nn.Module, data: Any) -> float: ...


_SPLITS_CACHE: dict[tuple, Splits] = {}  # one entry per process: (task data key, device) -> splits


def cached_splits(key: tuple, device: str | torch.device, make) -> Splits:
    """The splits for ``key`` on ``device``, made once per process (a worker trains many runs on the same data)."""
    full_key = (key, str(device))
    if full_key not in _SPLITS_CACHE:
        _SPLITS_CACHE.clear()  # keep one data set in memory
        _SPLITS_CACHE[full_key] = make().to(device)
    return _SPLITS_CACHE[full_key]


@torch.no_grad()
def query_counts(model: nn.Module, data: MQARData, batch_size: int, inputs, query_head: bool = False
                 ) -> tuple[int, int]:
    """(queries answered right, queries) with the argmax prediction at each query's key (labels shifted as in HF).
    query_head: the LM head runs at the query positions only (the model's loss_positions), not at every position.
    Counts stay on the device until the end: one host sync per call (two with query_head)."""
    model.eval()
    correct = total = None
    most = int((data.labels[:, 1:] != IGNORE_INDEX).sum(1).max()) if query_head else 0
    for start in range(0, len(data), batch_size):
        batch = data.subset(slice(start, start + batch_size))
        if query_head:
            positions = query_positions(batch.labels, max(most, 1))  # (B, Q)
            logits = model(**inputs(batch), loss_positions=positions).logits  # (B, Q, vocab)
            predicted = logits.argmax(dim=-1)
            target = batch.labels.gather(1, positions + 1).to(predicted.device)
        else:
            logits = model(**inputs(batch)).logits  # (B, T, vocab)
            predicted = logits[:, :-1].argmax(dim=-1)  # (B, T - 1): prediction for the next token
            target = batch.labels[:, 1:].to(predicted.device)
        mask = target != IGNORE_INDEX
        right, count = ((predicted == target) & mask).sum(), mask.sum()  # no boolean indexing: no host sync
        correct = right if correct is None else correct + right
        total = count if total is None else total + count
    return int(correct), int(total)


def recall_accuracy(model: nn.Module, data: MQARData, batch_size: int, device: str | torch.device) -> float:
    """Fraction of queries whose value is the argmax prediction at the query's key (labels shifted as in HF)."""
    correct, total = query_counts(model, data, batch_size, lambda batch: {"input_ids": batch.input_ids.to(device)})
    return correct / total


class MQARTask:
    """MQAR at a RecallSettings' grid (product or grid style, settings.py) and data style."""

    def __init__(self, settings):
        self.s = settings

    def data_key(self) -> tuple:
        s = self.s
        grids = tuple(tuple(map(tuple, g)) if g is not None else None for g in (s.train_grid, s.test_grid))
        return ("mqar", tuple(s.seq_lens), tuple(s.num_kv_pairs), grids, s.vocab_size, s.num_train, s.num_valid,
                s.num_test, s.seed, s.data_style)

    def make_splits(self) -> Splits:
        s = self.s
        if s.train_grid is not None:
            train_sets = {key: (key[0], [key[1]]) for key in training_sets(s)}
        else:
            train_sets = {t: (t, [n for n in s.num_kv_pairs if (t, n) in trained_settings(s)]) for t in s.seq_lens}
        valid_grid = trained_settings(s) if s.num_valid else []
        made = make_mqar_grid_splits(train_sets, settings_grid(s), valid_grid, s.vocab_size, s.num_train,
                                     s.num_valid, s.num_test, s.seed, style=s.data_style)
        return Splits(made.train, made.test, made.valid)

    def splits(self, device: str | torch.device) -> Splits:
        return cached_splits(self.data_key(), device, self.make_splits)

    def inputs(self, batch: MQARData) -> dict[str, torch.Tensor]:
        return {"input_ids": batch.input_ids}

    def _counts(self, model: nn.Module, data: MQARData) -> tuple:
        """query_counts under the run's fast-path settings (query-only head, bf16 autocast)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast_path(self.s, "bf16")):
            return query_counts(model, data, self.s.eval_batch_size, self.inputs, fast_path(self.s, "query_head"))

    def accuracy(self, model: nn.Module, data: MQARData) -> float:
        correct, total = self._counts(model, data)
        return correct / total

    def pooled_accuracy(self, model: nn.Module, sets: dict) -> float:
        """Fraction of all queries of several data sets answered right (the validation accuracy)."""
        counts = [self._counts(model, data) for data in sets.values()]
        return sum(c for c, _ in counts) / sum(t for _, t in counts)
