"""Shared test set-up: GPU tests skip cleanly without CUDA; Triton kernels run under the CPU interpreter.

The interpreter harness: a test file that runs Triton kernels on the CPU is also a script. Run as a script (in a
child process with TRITON_INTERPRET=1, which must be set before triton is imported) it computes its cases and
prints one JSON object (helpers.print_case_results); its tests take that object from the `interpret_results`
fixture and check it. Every test that uses the fixture is marked `interpret`: `pytest -m interpret` runs them
alone, `-m "not interpret"` leaves them out; the default run includes them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)  # `from helpers import ...` in every test folder


@pytest.hookimpl(tryfirst=True)  # before -m selects: the interpret marker must be on the items by then
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "interpret_results" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.interpret)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def interpret_results(request) -> dict:
    """The JSON object that the requesting test file, run as a script in a child process with TRITON_INTERPRET=1
    and one intra-op thread, prints last (helpers.print_case_results). The file may set INTERPRET_TIMEOUT
    (seconds, default 600)."""
    pytest.importorskip("triton")
    script = request.module.__file__
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    timeout = getattr(request.module, "INTERPRET_TIMEOUT", 600)
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter run of {script} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
