"""One decoding step of a memory rule for picked states of a state bank, updated in place.

    o = memory_step(rule, q, k, v, g, beta, bank, index, keep, scale=None, impl="auto")

Slot n reads the state bank[index[n]], takes one step of `rule` (q and k L2-normalised, as use_qk_l2norm=True
in the rule ops) and, where keep[n], writes the new state back to bank[index[n]].

impl: "recurrent" (gather, the rule's step loop, scatter), "triton" (the rule's step kernel in the registry,
memmix.ops.triton.recurrent_step: each state read once and written once, straight in the bank; CUDA, or Triton's
interpreter) or "auto": "triton" when that kernel runs on these tensors, the bank is float32, K is within the
kernel's limit (256), the inputs are not float64 and no gradient is wanted, else "recurrent".
"""
from __future__ import annotations

from typing import Optional

import torch

from memmix.checks import describe
from memmix.ops.registry import MemoryRule, get_rule

STEP_IMPLS = ("auto", "recurrent", "triton")


def memory_step(rule: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                beta: Optional[torch.Tensor], bank: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, *,
                scale: Optional[float] = None, impl: str = "auto") -> torch.Tensor:
    """One step of `rule` for N picked states of `bank`, which is updated in place.

    rule: a memory rule's name or alias (memmix.ops.registry); q, k: (N, H, K); v: (N, H, V), one float dtype;
    g: (N, H) log decay for the gated rules, else None; beta: (N, H) for the delta rules, else None;
    bank: (slots, H, K, V) float states; index: (N,) int64/int32 bank rows, each at most once (not checked:
    it would need a host sync); keep: (N,) bool, False leaves that state untouched (padding);
    scale: defaults to K ** -0.5. Returns o (N, H, V) in q's dtype, read from the updated state.
    """
    record = _validate(rule, q, k, v, g, beta, bank, index, keep, scale, impl)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "auto":
        inputs = [x for x in (q, k, v, g, beta) if x is not None]
        impl = "triton" if _triton_fits(record, inputs, bank) else "recurrent"
    if impl == "triton":
        return _triton_step(record, q, k, v, g, beta, bank, index, keep, scale)
    return recurrent_memory_step(record, q, k, v, g, beta, bank, index, keep, scale)


def recurrent_memory_step(rule: MemoryRule, q, k, v, g, beta, bank, index, keep, scale: float) -> torch.Tensor:
    """The reference: gather the picked states, one step of the rule's step loop, scatter back where keep."""
    before = bank.index_select(0, index)  # (N, H, K, V)
    args = [x.unsqueeze(1) for x in (q, k, v, g, beta) if x is not None]  # (N, 1, H, ...)
    o, after = rule.op(*args, scale=scale, initial_state=before, output_final_state=True, use_qk_l2norm=True,
                       impl="recurrent")
    bank.index_copy_(0, index.long(), torch.where(keep.view(-1, 1, 1, 1), after, before).to(bank.dtype))
    return o.squeeze(1)


def _triton_fits(rule: MemoryRule, inputs: list[torch.Tensor], bank: torch.Tensor) -> bool:
    """auto's test: the step kernel runs here, float32 states, K within its limit, no float64 inputs, no gradient
    wanted (the kernel is not differentiable)."""
    kernel = rule.step_kernel
    wants_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs + [bank])
    # the gates (g, beta) are read as float32 whatever their dtype: the limits are q's, k's, v's and the bank's
    return (kernel is not None and bank.dtype == torch.float32
            and kernel.fits(bank, *inputs[:3], head_dim=bank.shape[2], needs_grad=wants_grad))


def _triton_step(rule: MemoryRule, q, k, v, g, beta, bank, index, keep, scale: float) -> torch.Tensor:
    if bank.dtype != torch.float32:
        raise ValueError(f"impl='triton' needs a float32 bank, got {bank.dtype}; use impl='recurrent' (or 'auto')")
    kernel = rule.step_kernel
    if kernel is None or not kernel.runs_on(q, bank):
        raise RuntimeError(f"impl='triton' needs Triton and CUDA tensors, got device {q.device}; "
                           "use impl='recurrent' (or 'auto')")
    return kernel.fn(q, k, v, g, beta, bank, index, keep, scale)


def _validate(rule, q, k, v, g, beta, bank, index, keep, scale, impl) -> MemoryRule:
    """The rule's record; ValueError naming the first bad argument and what it may be (no host sync)."""
    record = get_rule(rule)
    if impl not in STEP_IMPLS:
        raise ValueError(f"impl must be one of {STEP_IMPLS}, got {impl!r}")
    for name, x, ndim in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("bank", bank, 4)):
        if not isinstance(x, torch.Tensor) or x.ndim != ndim or not x.is_floating_point():
            raise ValueError(f"{name} must be a {ndim}-D floating-point tensor, got {describe(x)}")
    N, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:2] != (N, H):
        raise ValueError(f"k must be (N, H, K) = {(N, H, K)} and v (N, H, V) = {(N, H, '*')}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if bank.shape[1:] != (H, K, V):
        raise ValueError(f"bank must be (slots, H, K, V) = (*, {H}, {K}, {V}), got {tuple(bank.shape)}")
    for name, x, needed in zip(("g", "beta"), (g, beta), (record.uses_gate, record.uses_beta)):
        if not needed and x is not None:
            raise ValueError(f"{name} must be None for rule {rule!r}, which takes no {name}")
        if needed and (not isinstance(x, torch.Tensor) or x.shape != (N, H) or not x.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point (N, H) = {(N, H)} tensor for rule {rule!r}, "
                             f"got {describe(x)}")
    if not isinstance(index, torch.Tensor) or index.shape != (N,) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be an (N,) = ({N},) int64 or int32 tensor, got {describe(index)}")
    if not isinstance(keep, torch.Tensor) or keep.shape != (N,) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be an (N,) = ({N},) bool tensor, got {describe(keep)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be None or a number, got {type(scale).__name__}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta), ("bank", bank), ("index", index), ("keep", keep)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    return record

