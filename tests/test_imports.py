"""Importing mumoe needs no framework and changes no global state."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "import mumoe, mumoe.functional, mumoe.budget, mumoe.presets\n"
        "net = mumoe.cp(4, 3, 2, rank=2)\n"
        "import numpy as np\n"
        "y = mumoe.forward(net, mumoe.random_cores(net), np.ones((2, 3)), np.ones((2, 4)))\n"
        "print(y.shape)"
    )
    assert run(code) == "(2, 2)"


@pytest.mark.parametrize("module", ["mumoe", "mumoe.nn", "mumoe.compat", "mumoe.testing"])
def test_import_keeps_the_tensorly_backend(module):
    pytest.importorskip("torch", reason="torch is not installed")
    code = f"import tensorly as tl; import {module}; print(tl.get_backend())"
    assert run(code) == "numpy"
