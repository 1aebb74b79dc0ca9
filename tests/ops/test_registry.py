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
from memmix.ops.common import resolve_impl
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
    # auto on CUDA takes a rule's registered kernel, else its chunked PyTorch form (no CUDA needed to decide)
    cuda = torch.device("cuda")
    assert resolve_impl("auto", "gated_delta_rule", cuda, 100) == "triton"
    assert resolve_impl("auto", "gated_linear_attention", cuda, 100) == "chunk"


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


def test_normalize_is_a_leaf():
    assert not any(name.startswith("memmix") for name in _imports(OPS_DIR / "normalize.py", top_level_only=True))


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        get_rule("delta_rule").uses_beta = False
