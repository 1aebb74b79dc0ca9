"""One optimiser step as one call: forward and loss per micro-batch, backward, clip, optimiser, schedule.

Both training loops use it: `memmix train` (memmix.training.trainer) and the recall benchmark
(memmix.evaluation.recall). Nothing here reads a value back to the host: the loss and the gradient norm come back
as device tensors, so a caller that logs every N steps synchronises only then.

    step = TrainStep(model, optimizer, scheduler, loss_fn=lambda model, batch: model(**batch).loss, grad_clip=1.0)
    out = step([batch])          # out.loss, out.grad_norm: 0-d float32 tensors on the model's device
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class StepOutput:
    """loss: mean loss over the step's micro-batches; grad_norm: total gradient norm before clipping.
    Both 0-d float32 tensors on the device, not synchronised."""

    loss: torch.Tensor
    grad_norm: torch.Tensor


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm to `max_norm` (0 = only measure); returns the norm before clipping as a 0-d
    tensor (a full tensor under FSDP2, whose norm is a DTensor). No host synchronisation."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.float()


class TrainStep:
    """forward + loss (under `autocast`), backward, clip, optimizer.step, scheduler.step, zero_grad.

    loss_fn(model, batch) -> 0-d loss tensor. micro_context(index, count) -> a context manager entered around each
    micro-batch's forward and backward (DDP/FSDP gradient-sync control), or None.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loss_fn: LossFn, *,
                 grad_clip: float = 1.0, autocast: ContextManager | None = None,
                 micro_context: Callable[[int, int], ContextManager] | None = None):
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = no clipping), got {grad_clip}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss_fn, self.grad_clip = loss_fn, grad_clip
        self.autocast = autocast
        self.micro_context = micro_context

    def __call__(self, micro_batches: Sequence[Any]) -> StepOutput:
        count = len(micro_batches)
        if count < 1:
            raise ValueError("TrainStep needs at least one micro-batch")
        loss_sum = None
        for index, batch in enumerate(micro_batches):
            sync = self.micro_context(index, count) if self.micro_context else contextlib.nullcontext()
            with sync:
                with self.autocast if self.autocast is not None else contextlib.nullcontext():
                    loss = self.loss_fn(self.model, batch)
                (loss / count).backward()
            loss = loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
        grad_norm = clip_grad_norm(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss=loss_sum / count, grad_norm=grad_norm)
