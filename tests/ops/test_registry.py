"""The memory-rule registry: one record per rule, lookups by name and alias, the kernels a backend registers, and
the rule that the ops never import the Triton backend themselves."""
from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import memmix.ops
from memmix.ops import registry
from memmix.ops.registry import Kernel, get_rule, rules

OPS_DIR = Path(memmix.ops.__file__).parent
# name -> (alias, takes g, takes beta)
EXPECTED = {
    "gated_delta_rule": ("gated_delta", True, True),
    "delta_rule": ("delta", False, True),
    "gated_linear_attention": ("gla", True, False),
    "linear_attention": ("linear", False, False),
}


def test_one_record_per_rule():
    assert [(r.name, r.alias, r.uses_gate, r.uses_beta) for r in rules()] == [
        (name, *values) for name, values in EXPECTED.items()]
    for rule in rules():
        assert rule.op is getattr(memmix.ops, rule.name)
        assert get_rule(rule.alias) is get_rule(rule.name) is rule


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match=r"rule must be one of \('gated_delta_rule'.*short names \('gated_delta'.*"
                                         r"got 'mamba'"):
        get_rule("mamba")


def test_names_are_taken_once():
    existing = get_rule("delta_rule")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_rule(replace(existing, name="another_delta_rule"))  # same alias
    with pytest.raises(ValueError, match="unknown memory rule 'mamba'"):
        registry.register_kernels("mamba", chunk=Kernel(lambda *args: None, runs_on=lambda *t: True))


def test_the_backend_registers_its_kernels():
    pytest.importorskip("triton")
    from memmix.ops import triton as backend

    for rule in rules():
        assert (rule.chunk_kernel is not None) == (rule.name in backend.KERNEL_RULES), rule.name
        assert rule.step_kernel is not None and rule.step_kernel.max_head_dim == backend.STEP_MAX_K
    assert registry.find_kernel("mom_segment_conv") is not None
    assert registry.find_kernel("mom_segment_combine") is not None
    assert registry.find_kernel("no_such_kernel") is None
    # each kernel's limits, as Kernel.fits reads them (resolve_impl itself on CUDA: tests/ops/triton/test_gated_delta_rule_gpu.py)
    assert get_rule("gated_delta_rule").chunk_kernel.max_head_dim == backend.MAX_HEAD_DIM
    assert not get_rule("gated_delta_rule").step_kernel.differentiable
    assert registry.find_kernel("gated_rms_norm").max_head_dim == backend.NORM_MAX_DIM


def _anywhere(*tensors):
    return True


@pytest.mark.parametrize("case, fits", [
    ("float32", True), ("bfloat16", True), ("float16", True), ("float64", False), ("int_index_ignored", True),
    ("head_at_limit", True), ("head_above_limit", False), ("grad_on_differentiable", True),
    ("grad_on_forward_only", False), ("other_device", False),
])
def test_kernel_fits_reads_dtype_head_width_gradient_and_device(case, fits):
    """The one test every impl="auto" asks (resolve_impl, the decoding step, the MoM mixer, GatedRMSNorm)."""
    dtype = getattr(torch, case) if case in ("float32", "bfloat16", "float16", "float64") else torch.float32
    x = torch.zeros(2, 3, dtype=dtype)
    tensors = (x, torch.zeros(2, dtype=torch.long)) if case == "int_index_ignored" else (x,)
    kernel = Kernel(lambda *a: None, runs_on=(lambda *t: False) if case == "other_device" else _anywhere,
                    max_head_dim=64, differentiable=case != "grad_on_forward_only")
    head_dim = {"head_at_limit": 64, "head_above_limit": 65}.get(case, 16)
    needs_grad = case.startswith("grad_")
    assert kernel.fits(*tensors, head_dim=head_dim, needs_grad=needs_grad) is fits


def test_a_registered_kernel_is_what_impl_triton_runs(monkeypatch):
    """impl="triton" calls the record's chunk kernel with the rule's contract (g None for a rule without decay)."""
    seen = {}

    def kernel(q, k, v, g, beta, **kwargs):
        seen.update(g=g, beta=beta, **kwargs)
        return v * 2, None

    record = replace(get_rule("delta_rule"), chunk_kernel=Kernel(kernel, runs_on=lambda *t: True))
    monkeypatch.setitem(registry._RULES, "delta_rule", record)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets CPU tensors through to a kernel
    q, v, beta = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 5), torch.rand(1, 3, 2)
    o, state = memmix.ops.delta_rule(q, q, v, beta, low_memory=True, impl="triton")
    assert torch.equal(o, v * 2) and state is None
    assert seen["g"] is None and seen["beta"] is beta and seen["low_memory"] is True and seen["scale"] == 0.5


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module (and imported name as module.name) that the file imports, or only at its top level."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_ops_never_import_the_triton_backend():
    """Outside memmix/ops/triton no ops module imports it, at any level: the registry finds its kernels."""
    modules = [p for p in OPS_DIR.rglob("*.py") if "triton" not in p.relative_to(OPS_DIR).parts[:-1]]
    assert len(modules) > 10
    for path in modules:
        assert not any(name.startswith("memmix.ops.triton") for name in _imports(path)), path


def test_normalize_and_dtypes_are_leaves():
    """Kernels import them without importing memmix.ops: they import nothing of memmix but each other."""
    assert not any(name.startswith("memmix") for name in _imports(OPS_DIR / "dtypes.py", top_level_only=True))
    assert {name for name in _imports(OPS_DIR / "normalize.py", top_level_only=True)
            if name.startswith("memmix")} <= {"memmix.ops.dtypes", "memmix.ops.dtypes.compute_dtype"}


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        get_rule("delta_rule").uses_beta = False
