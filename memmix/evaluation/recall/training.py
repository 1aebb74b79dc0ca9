"""The recall benchmarks' training loop: AdamW + warm-up/cosine through memmix.training.step.TrainStep.

Nothing in a step reads a value back to the host: the data sits on the device, batch indices are drawn on the
host one epoch at a time (one copy per epoch), every batch of a training set has the same shape, and the loss is
read back every ``log_every`` steps (and at validation checks), not every step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Recipe:
    """How one run trains. stop_accuracy (with a validate function): stop once the validation accuracy, checked
    every eval_every steps, reaches it; the schedule still spans ``steps``."""

    steps: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    batch_size: int
    seed: int
    log_every: int = 10
    eval_every: int = 250
    stop_accuracy: float | None = None
    cuda_graph: bool = False  # capture each step as a CUDA graph (memmix.training.step.TrainStep; CUDA only)
    query_head: bool = False  # LM head and loss at the query positions only (the model's loss_positions)
    bf16: bool = False  # bf16 autocast around the forward (CUDA only; weights, optimiser and states stay float32)


@dataclass
class TrainingLog:
    """losses: every step's loss; valid_curve: (step, validation accuracy) of each check; steps: steps taken."""

    losses: list[float] = field(default_factory=list)
    valid_curve: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    stopped_early: bool = False


def endless_batches(train: dict, batch_size: int, seed: int) -> Iterator[Any]:
    """Endless training batches: the training sets in turn (sorted by key), each a fresh shuffle of its examples
    every epoch. Indices are drawn on the host and copied to the data's device once per epoch.

    train: key -> a data set with len(), subset(index) and input_ids (MQARData, MixedRecallData)."""
    for key, index in batch_indices(train, batch_size, seed):
        yield train[key].subset(index)


def batch_indices(train: dict, batch_size: int, seed: int) -> Iterator[tuple[Any, torch.Tensor]]:
    """(training-set key, row index on the data's device) of every batch of endless_batches, in its order."""
    generator = torch.Generator().manual_seed(seed)
    orders: dict[Any, torch.Tensor | None] = {key: None for key in train}
    while True:
        for key, data in sorted(train.items()):
            order = orders[key]
            while order is None or len(order) < batch_size:
                fresh = torch.randperm(len(data), generator=generator).to(data.input_ids.device)
                order = fresh if order is None else torch.cat([order, fresh])
            index, orders[key] = order[:batch_size], order[batch_size:]
            yield key, index


def train_steps(model: nn.Module, train: dict, inputs: Callable[[Any], dict], recipe: Recipe,
                on_log: Callable[[int, float], None] | None = None,
                validate: Callable[[], float] | None = None) -> TrainingLog:
    """Train ``model`` on endless_batches(train) with model(**inputs(batch), labels=batch.labels).loss.

    on_log(steps_done, latest_loss) runs at each loss read-back; validate() -> validation accuracy (it may put
    the model in eval mode) runs every recipe.eval_every steps when recipe.stop_accuracy is set."""
    from memmix.training.optim import build_optimizer, cosine_schedule
    from memmix.training.step import TrainStep

    optimizer = build_optimizer(model, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = cosine_schedule(optimizer, warmup_steps=int(recipe.warmup_fraction * recipe.steps),
                               total_steps=recipe.steps)
    def loss(m, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=recipe.bf16):
            return m(**batch).loss

    step = TrainStep(model, optimizer, schedule, loss, grad_clip=1.0, cuda_graph=recipe.cuda_graph)
    model.train()
    log = TrainingLog()
    pending: list[torch.Tensor] = []  # device losses not read back yet
    batches = _model_batches(train, inputs, recipe)
    checks = validate is not None and recipe.stop_accuracy is not None
    for index in range(recipe.steps):
        pending.append(step([next(batches)]).loss)  # a dict of tensors of one shape per training set
        done = index + 1
        check = checks and done % recipe.eval_every == 0
        if done % recipe.log_every == 0 or done == recipe.steps or check:
            log.losses += torch.stack(pending).tolist()
            pending.clear()
            if on_log is not None:
                on_log(done, log.losses[-1])
        log.steps = done
        if check:
            accuracy = validate()
            model.train()
            log.valid_curve.append((done, accuracy))
            if accuracy >= recipe.stop_accuracy:
                log.stopped_early = True
                break
    return log


def _model_batches(train: dict, inputs: Callable[[Any], dict], recipe: Recipe) -> Iterator[dict]:
    """endless_batches as the model's keyword arguments: inputs(batch), labels and, with recipe.query_head, the
    query positions (Q per training set: its largest number of queries in a row)."""
    positions = {}
    if recipe.query_head:
        from memmix.data.mqar import query_positions

        for key, data in train.items():
            most = int((data.labels[:, 1:] != -100).sum(1).max())  # once per training set, before training
            positions[key] = query_positions(data.labels, max(most, 1))
    for key, index in batch_indices(train, recipe.batch_size, recipe.seed):
        batch = train[key].subset(index)
        arguments = dict(inputs(batch), labels=batch.labels)
        if recipe.query_head:
            arguments["loss_positions"] = positions[key].index_select(0, index)
        yield arguments
