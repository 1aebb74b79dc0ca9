"""A training step captured as CUDA graphs and replayed: one launch per step instead of hundreds.

memmix.training.step.TrainStep(cuda_graph=True) runs through GraphedStep: the whole step -- every micro-batch's
forward and backward, the clip and the optimiser update -- is captured once per batch shape as one CUDA graph and
replayed, so small models train at the speed of the GPU rather than of Python. The schedule stays on the host: the
learning rate lives in a device tensor (make_capturable) that `scheduler.step()` fills between replays.
Requirements: every batch is a dict / tuple / list of tensors of a fixed shape per graph (a new shape captures a new
graph), the loss reads only those tensors (and tensors that never move, such as a data set kept on the GPU), and the
model's step never syncs the host (`find_host_syncs` checks that on any device). The first `warmup_steps` steps of
each shape run eagerly (compilation, autotuning, allocator warm-up); they are ordinary training steps.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

StepFn = Callable[[Sequence[Any]], Any]


class GraphCaptureError(ValueError):
    """A step that cannot be captured as a CUDA graph (it reads device values back to the host)."""


class CudaGraph:
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


@dataclass
class _Graph:
    """One captured step for one batch signature: static inputs, the graph, its outputs."""

    warmups: int = 0
    static: Any = None
    graph: Any = None
    keep: list = field(default_factory=list)  # tensors the graph writes into (gradients), kept alive with it


class GraphedStep:
    """A training step run as CUDA graphs, one per batch signature (structure, shapes and dtypes of the micro-batches).

    recorder(stream) -> an object with record(fn) and replay() (CudaGraph; tests: an emulation that runs fn). stream:
    the CUDA stream the steps run on, None for an emulation (CPU tests).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, recorder: Callable,
                 stream: Any, warmup_steps: int):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.recorder, self.stream, self.warmup_steps = recorder, stream, warmup_steps
        self._graphs: dict[tuple, _Graph] = {}

    def __call__(self, micro_batches: Sequence[Any], forward_backward: StepFn, eager: StepFn,
                 eager_checked: StepFn) -> Any:
        """One step. forward_backward(micro_batches) -> outputs (a tuple / named tuple / dict of tensors): forward,
        backward, clip and update, what a graph holds. eager and eager_checked (micro_batches) -> outputs: an ordinary
        step, schedule and zero_grad included: the warm-up steps of each signature, the last one before a real capture
        checked for host reads. (Passed per call, not kept: a step kept here would hold itself in a reference cycle,
        and a finished run's GPU memory would wait for the garbage collector.)"""
        if self.stream is None:  # an emulated graph (CPU tests)
            return self._graphed(micro_batches, forward_backward, eager, eager_checked)
        # the caller's stream made the inputs and will read the outputs: order the step stream after it and the
        # caller's stream after the step (GPU-side waits, no host sync; no-ops when the caller is inside
        # torch.cuda.stream(step.stream), which is how several runs overlap on one GPU)
        caller = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            out = self._graphed(micro_batches, forward_backward, eager, eager_checked)
        for tensor in pytree.tree_leaves(list(micro_batches)):
            tensor.record_stream(self.stream)  # not reused by the caller's allocations before the step read it
        caller.wait_stream(self.stream)
        for tensor in pytree.tree_leaves(out):
            tensor.record_stream(caller)
        return out

    def _graphed(self, micro_batches: Sequence[Any], forward_backward: StepFn, eager: StepFn,
                 eager_checked: StepFn) -> Any:
        key = _signature(micro_batches)
        entry = self._graphs.setdefault(key, _Graph())
        if entry.warmups < self.warmup_steps:  # eager: compile, autotune, warm the allocator
            entry.warmups += 1
            if entry.warmups == self.warmup_steps and self.stream is not None:
                return eager_checked(micro_batches)
            return eager(micro_batches)
        if entry.graph is None:
            self._capture(entry, micro_batches, forward_backward)
        pytree.tree_map(lambda static, new: static.copy_(new, non_blocking=True), entry.static, list(micro_batches))
        out = entry.graph.replay()
        self.optimizer.zero_grad(set_to_none=True)  # .grad stays None between steps, as after an eager step
        self.scheduler.step()  # fills the learning-rate tensor that the next replay reads
        return pytree.tree_map(torch.clone, out)  # the next replay overwrites the graph's own

    def _capture(self, entry: _Graph, micro_batches: Sequence[Any], forward_backward: StepFn) -> None:
        """Record the step for this batch signature; its gradients get their own buffers in the graph's pool."""
        device = next(self.model.parameters()).device
        entry.static = pytree.tree_map(lambda t: torch.empty_like(t, device=device), list(micro_batches))
        self.optimizer.zero_grad(set_to_none=True)
        entry.graph = self.recorder(self.stream)
        entry.graph.record(lambda: forward_backward(entry.static))
        entry.keep = [p.grad for p in self.model.parameters() if p.grad is not None]  # the graph writes these
        self.optimizer.zero_grad(set_to_none=True)


def _signature(micro_batches: Sequence[Any]) -> tuple:
    """Shapes, dtypes and structure of a step's batches: one graph per signature."""
    leaves, spec = pytree.tree_flatten(list(micro_batches))
    bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
    if bad:
        raise TypeError(f"TrainStep(cuda_graph=True): a batch must be a dict/tuple/list of tensors, found a {bad[0]}")
    return (str(spec),) + tuple((tuple(x.shape), x.dtype) for x in leaves)


def check_graphable(model: nn.Module, optimizer, micro_context, emulated: bool) -> torch.device:
    """The device a captured step of `model` runs on; ValueError naming what a capture does not support."""
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


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam(W) keeps its step counts on the device and reads its learning rate from a device tensor, so a captured
    update follows the schedule. Done after the scheduler was built: its base rates stay host floats."""
    for group in optimizer.param_groups:
        group["capturable"] = device.type == "cuda"  # Adam supports it on accelerators only (emulation: CPU)
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)


def without_cache(autocast):
    """The same autocast without its weight-cast cache (cached casts made outside a graph go stale inside it)."""
    if isinstance(autocast, torch.autocast):
        return torch.autocast(autocast.device, dtype=autocast.fast_dtype, enabled=autocast._enabled,
                              cache_enabled=False)
    return autocast
