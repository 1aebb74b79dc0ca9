"""One optimiser step as one call: forward and loss per micro-batch, backward, clip, optimiser, schedule.

Both training loops use it: `memmix train` (memmix.training.trainer) and the recall benchmark
(memmix.evaluation.recall). Nothing here reads a value back to the host: the loss and the gradient norm come back
as device tensors, so a caller that logs every N steps synchronises only then.

    step = TrainStep(model, optimizer, scheduler, loss_fn=lambda model, batch: model(**batch).loss, grad_clip=1.0)
    out = step([batch])          # out.loss, out.grad_norm: 0-d float32 tensors on the model's device

With `cuda_graph=True` (CUDA only) the whole step is captured once per batch shape as one CUDA graph and replayed
(memmix.training.graph_capture, which lists what a captured step requires).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ContextManager, NamedTuple

import torch
from torch import nn

from memmix.host_syncs import find_host_syncs
from memmix.training.graph_capture import (
    CudaGraph,
    GraphCaptureError,
    GraphedStep,
    check_graphable,
    make_capturable,
    without_cache,
)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class StepOutput(NamedTuple):
    """loss: mean loss over the step's micro-batches; grad_norm: total gradient norm before clipping.
    Both 0-d float32 tensors on the device, not synchronised. (A named tuple: a captured step clones and orders its
    tensors as a pytree.)"""

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
    cuda_graph: capture and replay the step as a CUDA graph (memmix.training.graph_capture); the optimiser must be
    Adam/AdamW (made `capturable`, learning rate moved into a device tensor); micro_context is not supported.
    stream: the CUDA stream graph steps run on (several TrainSteps on their own streams overlap on one GPU);
    default: a new stream per TrainStep. graph_recorder: a stand-in for the CUDA graph (tests: a recorder that runs the function).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loss_fn: LossFn, *,
                 grad_clip: float = 1.0, autocast: ContextManager | None = None,
                 micro_context: Callable[[int, int], ContextManager] | None = None, cuda_graph: bool = False,
                 warmup_steps: int = 3, stream: Any = None, graph_recorder: Callable | None = None):
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = no clipping), got {grad_clip}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (compilation and allocation happen there), got {warmup_steps}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss_fn, self.grad_clip = loss_fn, grad_clip
        self.autocast = autocast
        self.micro_context = micro_context
        self.cuda_graph = cuda_graph
        self.warmup_steps = warmup_steps
        self.stream = None
        self._graphed_step: GraphedStep | None = None
        if cuda_graph:
            device = check_graphable(model, optimizer, micro_context, emulated=graph_recorder is not None)
            self.autocast = without_cache(autocast)
            make_capturable(optimizer, device)
            if device.type == "cuda":
                self.stream = stream if stream is not None else torch.cuda.Stream(device)
            self._graphed_step = GraphedStep(model, optimizer, scheduler, recorder=graph_recorder or CudaGraph,
                                             stream=self.stream, warmup_steps=warmup_steps)

    def __call__(self, micro_batches: Sequence[Any]) -> StepOutput:
        if len(micro_batches) < 1:
            raise ValueError("TrainStep needs at least one micro-batch")
        if self._graphed_step is None:
            return self._eager(micro_batches)
        return self._graphed_step(micro_batches, self._forward_backward, self._eager, self._eager_checked)

    def read(self, outputs: Sequence[StepOutput]) -> list[float]:
        """The losses of `outputs` as floats (one host synchronisation for all of them, on this step's stream)."""
        if not outputs:
            return []
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return torch.stack([o.loss for o in outputs]).tolist()

    # ------------------------------------------------------------------------------------------ the step itself

    def _forward_backward(self, micro_batches: Sequence[Any]) -> StepOutput:
        """Everything a graph captures: each micro-batch's loss and backward, then the clip and the update."""
        loss = self._losses_and_grads(micro_batches)
        return StepOutput(loss=loss, grad_norm=self._update())

    def _losses_and_grads(self, micro_batches: Sequence[Any]) -> torch.Tensor:
        """Forward and backward of every micro-batch (gradients accumulate); their mean loss, detached."""
        count = len(micro_batches)
        loss_sum = None
        for index, batch in enumerate(micro_batches):
            sync = self.micro_context(index, count) if self.micro_context else contextlib.nullcontext()
            with sync:
                with self.autocast if self.autocast is not None else contextlib.nullcontext():
                    loss = self.loss_fn(self.model, batch)
                (loss / count).backward()
            loss = loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
        return loss_sum / count

    def _update(self) -> torch.Tensor:
        """Clip and step the optimiser; the gradient norm before clipping."""
        grad_norm = clip_grad_norm(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return grad_norm

    def _eager(self, micro_batches: Sequence[Any]) -> StepOutput:
        out = self._forward_backward(micro_batches)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _eager_checked(self, micro_batches: Sequence[Any]) -> StepOutput:
        """The last warm-up step before a capture, its forward and backward watched for reads back to the host (the
        optimiser's update is left out: on CUDA it is capturable): a step that makes one cannot be captured, so it
        stops here naming them, not inside the capture."""
        holder = {}
        found = find_host_syncs(lambda: holder.setdefault("loss", self._losses_and_grads(micro_batches)))
        if found:
            raise GraphCaptureError(f"the training step reads values back to the host ({', '.join(sorted(set(found)))})"
                                    ", so it cannot be captured as a CUDA graph; train without cuda_graph")
        out = StepOutput(holder["loss"], self._update())
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out
