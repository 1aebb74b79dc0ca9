"""Shared test set-up: GPU tests skip cleanly without CUDA; Triton kernels run under the CPU interpreter.

The interpreter harness: a test file that runs Triton kernels on the CPU is also a script. Run as a script (in a
child process with TRITON_INTERPRET=1, which must be set before triton is imported) it computes its cases and
prints one JSON object (helpers.print_case_results); its tests take that object from the `interpret_results`
fixture and check it. The scripts of the selected tests all start when collection ends and run beside the rest
of the session (on a 2-core CI machine they are most of the default run's CPU time). Every test that uses the fixture is marked `interpret`: `pytest -m interpret` runs them
alone, `-m "not interpret"` leaves them out; the default run includes them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)  # `from helpers import ...` in every test folder


@pytest.hookimpl(tryfirst=True)  # before -m selects: the interpret marker must be on the items by then
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "interpret_results" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.interpret)
    # the interpreter scripts' test files last: the other tests run while their child processes compute
    scripts = set(_interpreter_scripts(items))
    items.sort(key=lambda item: str(item.path) in scripts)  # stable: the order within each group is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# script path -> its child process, started when collection ends (pytest_collection_finish) so that the interpreter
# scripts run beside each other and beside the other tests: together they are most of the default run's CPU time,
# and one at a time they kept the run's other cores idle
_CHILDREN: dict[str, "_Child"] = {}


class _Child:
    """One interpreter script running in a child process, its output in temporary files (a pipe left unread until
    the fixture asks would stall a script that writes much)."""

    def __init__(self, script: str):
        path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
        self.script = script
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, script], env=env, stdout=self.stdout, stderr=self.stderr,
                                     text=True)

    def result(self, timeout: float) -> dict:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"interpreter run of {self.script} took more than {timeout} s") from None
        self.stdout.seek(0)
        self.stderr.seek(0)
        out, err = self.stdout.read(), self.stderr.read()
        assert self.proc.returncode == 0, f"interpreter run of {self.script} failed:\n{err[-4000:]}"
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()


def _interpreter_scripts(items) -> list[str]:
    return list(dict.fromkeys(str(item.path) for item in items
                              if "interpret_results" in getattr(item, "fixturenames", ())))


def pytest_collection_finish(session):
    if importlib.util.find_spec("triton") is None or session.config.option.collectonly:
        return
    for script in _interpreter_scripts(session.items):
        _CHILDREN[script] = _Child(script)


def pytest_sessionfinish(session):
    for child in _CHILDREN.values():
        child.stop()
    _CHILDREN.clear()


@pytest.fixture(scope="module")
def interpret_results(request) -> dict:
    """The JSON object that the requesting test file, run as a script in a child process with TRITON_INTERPRET=1
    and one intra-op thread, prints last (helpers.print_case_results). The child starts when collection ends; the
    file may set INTERPRET_TIMEOUT (seconds from the first test that asks for the results, default 600)."""
    pytest.importorskip("triton")
    script = str(request.path)
    child = _CHILDREN.pop(script, None) or _Child(script)
    try:
        return child.result(getattr(request.module, "INTERPRET_TIMEOUT", 600))
    finally:
        child.stop()
