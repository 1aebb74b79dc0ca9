"""The memory rules, one record each, and the kernels that backends register for them.

    rule = get_rule("gated_delta")          # by name ("gated_delta_rule") or by the layers' short alias
    rule.uses_gate, rule.uses_beta          # which of g (log decay) and beta (write strength) it takes
    rule.op(q, k, v, g, beta, impl=...)     # the public op; rule.recurrent / rule.chunk: its PyTorch cores
    rule.chunk_kernel, rule.step_kernel     # a backend's kernels (Kernel) or None

Who writes here: each rule module (delta_rule.py, linear_attention.py) registers its rules when it is imported,
and memmix.ops imports them all, so the table is complete once `memmix.ops` is. A kernel backend registers its
kernels into the records (register_kernels) and the kernels of other ops by name (register_kernel).

How impl="auto" finds kernels without an import cycle: the ops never import a backend. The first lookup here
(get_rule, rules, find_kernel) imports the modules in KERNEL_BACKENDS once; importing memmix.ops.triton registers
its kernels (only when Triton is installed; it never imports Triton itself, its kernels load on first use). A
backend imports this module, never the other way round at import time.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

KERNEL_BACKENDS = ("memmix.ops.triton",)

# A rule's PyTorch core: core(q, k, v, g, beta, state) -> (o, final_state) on dense (N, L, H, ...) tensors,
# q already normalised and scaled (see memmix.ops.common).
CoreFn = Callable[..., "tuple"]


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Kernel:
    """A backend's kernel and its limits: `fn` (its calling contract is the registry entry's, see register_kernels),
    `runs_on(*tensors)`: True when it can run on those tensors (their device); the input dtypes it takes; the largest
    head (or row) width it takes (None: any); whether it has a backward.

    `fits` is the one test every impl="auto" asks before it picks a kernel: where it says no, the caller takes the
    PyTorch path (docs/design.md, "Which implementation runs")."""

    fn: Callable
    runs_on: Callable[..., bool]
    max_head_dim: Optional[int] = None
    dtypes: tuple = FLOAT_DTYPES
    differentiable: bool = True

    def fits(self, *tensors, head_dim: Optional[int] = None, needs_grad: bool = False) -> bool:
        """True when the kernel takes these tensors: their device, every floating-point dtype, the head width, and a
        gradient if one is wanted."""
        return (self.runs_on(*tensors)
                and all(t.dtype in self.dtypes for t in tensors if t.is_floating_point())
                and (self.max_head_dim is None or head_dim is None or head_dim <= self.max_head_dim)
                and (self.differentiable or not needs_grad))


@dataclass(frozen=True)
class MemoryRule:
    """One memory rule: S = exp(g) S, then a write of k with v (delta rules: beta (v - S^T k)), o = S^T q.

    name: the op's name ("gated_delta_rule"); alias: the layers' short name ("gated_delta");
    uses_gate: takes g, a log decay per head and token; uses_beta: takes beta, the delta write strength;
    op: the public op (memmix.ops.<name>); recurrent: the step loop (the reference); chunk: the chunkwise-parallel
    PyTorch form; chunk_kernel, step_kernel: a backend's chunked sequence kernel and its decoding step on a state
    bank, or None.
    """

    name: str
    alias: str
    uses_gate: bool
    uses_beta: bool
    op: Callable
    recurrent: CoreFn
    chunk: CoreFn
    chunk_kernel: Optional[Kernel] = None
    step_kernel: Optional[Kernel] = None


_RULES: dict[str, MemoryRule] = {}
_KERNELS: dict[str, Kernel] = {}
_backends_loaded = False


def register_rule(rule: MemoryRule) -> None:
    """Add a rule (its name and alias must be new)."""
    taken = {r.name for r in _RULES.values()} | {r.alias for r in _RULES.values()}
    if rule.name in taken or rule.alias in taken:
        raise ValueError(f"a memory rule named {rule.name!r} or {rule.alias!r} is already registered")
    _RULES[rule.name] = rule


def register_kernels(name: str, *, chunk: Optional[Kernel] = None, step: Optional[Kernel] = None) -> None:
    """A backend's kernels for rule `name` (None leaves that kernel as it is).

    chunk.fn(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm, low_memory)
        -> (o, final_state): the public op's contract with g / beta None where the rule takes none and `scale`
        resolved to a float.
    step.fn(q, k, v, g, beta, bank, index, keep, scale) -> o: one decoding step in place, see memmix.ops.decode.
    """
    if name not in _RULES:
        raise ValueError(f"cannot register kernels for unknown memory rule {name!r}; known: {tuple(_RULES)}")
    rule = _RULES[name]
    _RULES[name] = dataclasses.replace(rule, chunk_kernel=rule.chunk_kernel if chunk is None else chunk,
                                       step_kernel=rule.step_kernel if step is None else step)


def register_kernel(name: str, kernel: Kernel) -> None:
    """A backend's kernel for another op, found by find_kernel(name) (e.g. the MoM mixer's "mom_segment_conv")."""
    _KERNELS[name] = kernel


def _load_backends() -> None:
    """Import the kernel backends once; one that cannot be imported registers nothing."""
    global _backends_loaded
    if _backends_loaded:
        return
    _backends_loaded = True  # first: a backend's own lookups while it is imported must not import it again
    for module in KERNEL_BACKENDS:
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def get_rule(name: str) -> MemoryRule:
    """The rule called `name` (its op name or its alias); ValueError naming the accepted values otherwise."""
    _load_backends()
    if name in _RULES:
        return _RULES[name]
    for rule in _RULES.values():
        if rule.alias == name:
            return rule
    raise ValueError(f"rule must be one of {tuple(_RULES)} or their short names "
                     f"{tuple(r.alias for r in _RULES.values())}, got {name!r}")


def rules() -> tuple[MemoryRule, ...]:
    """Every registered rule, in registration order."""
    _load_backends()
    return tuple(_RULES.values())


def find_kernel(name: str) -> Optional[Kernel]:
    """The kernel a backend registered under `name`, or None."""
    _load_backends()
    return _KERNELS.get(name)
