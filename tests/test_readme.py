"""Every ```python block of README.md runs as written, on its own, in a fresh interpreter (in an empty folder)."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def _digest(code: str) -> str:
    return hashlib.sha1(code.encode()).hexdigest()[:12]


BLOCKS = python_blocks(open(os.path.join(REPO, "README.md"), encoding="utf-8").read())

@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i + 1}-{_digest(c)}" for i, c in enumerate(BLOCKS)])
def test_readme_python_block_runs_on_its_own(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 1
