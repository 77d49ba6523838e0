"""Every ```python block of README.md runs as written (CPU, in a fresh temporary folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    if not os.path.exists(README):  # an installed copy of the tests without the repository
        return []
    with open(README, encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((f"README.md:{line}", m.group(1)))
    return out


BLOCKS = _blocks()


def test_readme_has_python_examples():
    if not os.path.exists(README):
        pytest.skip("README.md not next to the tests")
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_example_runs(code, tmp_path):
    if "diffusers" in code:
        pytest.importorskip("diffusers")
    # A fresh interpreter: each example is self-contained, as a reader would paste it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
