"""One optimiser step as one call: forward and loss per micro-batch, backward, clip, optimiser, schedule.

Both training loops use it: `memmix train` (memmix.training.trainer) and the recall benchmark
(memmix.evaluation.recall). Nothing here reads a value back to the host: the loss and the gradient norm come back
as device tensors, so a caller that logs every N steps synchronises only then.

    step = TrainStep(model, optimizer, scheduler, loss_fn=lambda model, batch: model(**batch).loss, grad_clip=1.0)
    out = step([batch])          # out.loss, out.grad_norm: 0-d float32 tensors on the model's device

With `cuda_graph=True` (CUDA only) the whole step -- every micro-batch's forward and backward, the clip and the
optimiser update -- is captured once per batch shape as one CUDA graph and replayed: one launch instead of
hundreds, so small models train at the speed of the GPU rather than of Python. The schedule stays on the host: the
learning rate lives in a device tensor that `scheduler.step()` fills between replays. Requirements: every batch is a
dict / tuple / list of tensors of a fixed shape per graph (a new shape captures a new graph), `loss_fn` reads only
those tensors (and tensors that never move, such as a data set kept on the GPU), and the model's step never syncs
the host (`find_host_syncs` checks that on any device). The first `warmup_steps` steps of each shape run eagerly
(compilation, autotuning, allocator warm-up); they are ordinary training steps.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch
from torch import nn
from torch.utils import _pytree as pytree

from memmix.host_syncs import find_host_syncs

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


@dataclass
class _Graph:
    """One captured step for one batch signature: static inputs, the graph, its outputs."""

    warmups: int = 0
    static: Any = None
    graph: Any = None
    keep: list = field(default_factory=list)  # tensors the graph writes into (gradients), kept alive with it


class TrainStep:
    """forward + loss (under `autocast`), backward, clip, optimizer.step, scheduler.step, zero_grad.

    loss_fn(model, batch) -> 0-d loss tensor. micro_context(index, count) -> a context manager entered around each
    micro-batch's forward and backward (DDP/FSDP gradient-sync control), or None.
    cuda_graph: capture and replay the step as a CUDA graph (see the module docstring); the optimiser must be
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
        self._graphs: dict[tuple, _Graph] = {}
        self._recorder = None
        if cuda_graph:
            device = _check_graphable(model, optimizer, micro_context, emulated=graph_recorder is not None)
            self.autocast = _without_cache(autocast)
            _make_capturable(optimizer, device)
            if device.type == "cuda":
                self.stream = stream if stream is not None else torch.cuda.Stream(device)
            self._recorder = graph_recorder or _CudaGraph

    def __call__(self, micro_batches: Sequence[Any]) -> StepOutput:
        if len(micro_batches) < 1:
            raise ValueError("TrainStep needs at least one micro-batch")
        if self._recorder is None:
            return self._eager(micro_batches)
        if self.stream is None:  # an emulated graph (CPU tests)
            return self._graphed(micro_batches)
        # the caller's stream made the inputs and will read the outputs: order the step stream after it and the
        # caller's stream after the step (GPU-side waits, no host sync; no-ops when the caller is inside
        # torch.cuda.stream(step.stream), which is how several runs overlap on one GPU)
        caller = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            out = self._graphed(micro_batches)
        for tensor in pytree.tree_leaves(list(micro_batches)):
            tensor.record_stream(self.stream)  # not reused by the caller's allocations before the step read it
        caller.wait_stream(self.stream)
        for tensor in (out.loss, out.grad_norm):
            tensor.record_stream(caller)
        return out

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

    def _graphed(self, micro_batches: Sequence[Any]) -> StepOutput:
        key = _signature(micro_batches)
        entry = self._graphs.setdefault(key, _Graph())
        if entry.warmups < self.warmup_steps:  # eager: compile, autotune, warm the allocator
            entry.warmups += 1
            if entry.warmups == self.warmup_steps and self.stream is not None:
                return self._eager_checked(micro_batches)
            return self._eager(micro_batches)
        if entry.graph is None:
            self._capture(entry, micro_batches)
        pytree.tree_map(lambda static, new: static.copy_(new, non_blocking=True), entry.static, list(micro_batches))
        out = entry.graph.replay()
        self.optimizer.zero_grad(set_to_none=True)  # .grad stays None between steps, as after an eager step
        self.scheduler.step()  # fills the learning-rate tensor that the next replay reads
        return StepOutput(out.loss.clone(), out.grad_norm.clone())

    def _capture(self, entry: _Graph, micro_batches: Sequence[Any]) -> None:
        """Record the step for this batch signature; its gradients get their own buffers in the graph's pool."""
        device = next(self.model.parameters()).device
        entry.static = pytree.tree_map(lambda t: torch.empty_like(t, device=device), list(micro_batches))
        self.optimizer.zero_grad(set_to_none=True)
        entry.graph = self._recorder(self.stream)
        entry.graph.record(lambda: self._forward_backward(entry.static))
        entry.keep = [p.grad for p in self.model.parameters() if p.grad is not None]  # the graph writes these
        self.optimizer.zero_grad(set_to_none=True)


class GraphCaptureError(ValueError):
    """A step that cannot be captured as a CUDA graph (it reads device values back to the host)."""


class _CudaGraph:
    """record(fn) captures fn's kernels without running them; replay() runs them and returns fn's outputs (the
    same tensors every time: the next replay overwrites them)."""

    def __init__(self, stream):
        self.graph, self.stream, self.outputs = torch.cuda.CUDAGraph(), stream, None

    def record(self, fn: Callable[[], Any]) -> None:
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.outputs = fn()

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


def _signature(micro_batches: Sequence[Any]) -> tuple:
    """Shapes, dtypes and structure of a step's batches: one graph per signature."""
    leaves, spec = pytree.tree_flatten(list(micro_batches))
    bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
    if bad:
        raise TypeError(f"TrainStep(cuda_graph=True): a batch must be a dict/tuple/list of tensors, found a {bad[0]}")
    return (str(spec),) + tuple((tuple(x.shape), x.dtype) for x in leaves)


def _check_graphable(model: nn.Module, optimizer, micro_context, emulated: bool) -> torch.device:
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type != "cuda" and not emulated:
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {device}; use cuda_graph=False")
    if micro_context is not None:
        raise ValueError("cuda_graph=True does not support micro_context (DDP/FSDP gradient sync); use "
                         "cuda_graph=False")
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"cuda_graph=True supports torch.optim.Adam/AdamW, got {type(optimizer).__name__}")
    return device


def _make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam(W) keeps its step counts on the device and reads its learning rate from a device tensor, so a captured
    update follows the schedule. Done after the scheduler was built: its base rates stay host floats."""
    for group in optimizer.param_groups:
        group["capturable"] = device.type == "cuda"  # Adam supports it on accelerators only (emulation: CPU)
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)


def _without_cache(autocast):
    """The same autocast without its weight-cast cache (cached casts made outside a graph go stale inside it)."""
    if isinstance(autocast, torch.autocast):
        return torch.autocast(autocast.device, dtype=autocast.fast_dtype, enabled=autocast._enabled,
                              cache_enabled=False)
    return autocast
