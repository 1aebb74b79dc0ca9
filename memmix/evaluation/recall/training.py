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
    generator = torch.Generator().manual_seed(seed)
    orders: dict[Any, torch.Tensor | None] = {key: None for key in train}
    while True:
        for key, data in sorted(train.items()):
            order = orders[key]
            while order is None or len(order) < batch_size:
                fresh = torch.randperm(len(data), generator=generator).to(data.input_ids.device)
                order = fresh if order is None else torch.cat([order, fresh])
            index, orders[key] = order[:batch_size], order[batch_size:]
            yield data.subset(index)


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
    step = TrainStep(model, optimizer, schedule, lambda m, batch: m(**inputs(batch), labels=batch.labels).loss,
                     grad_clip=1.0)
    model.train()
    log = TrainingLog()
    pending: list[torch.Tensor] = []  # device losses not read back yet
    batches = endless_batches(train, recipe.batch_size, recipe.seed)
    checks = validate is not None and recipe.stop_accuracy is not None
    for index in range(recipe.steps):
        pending.append(step([next(batches)]).loss)
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
