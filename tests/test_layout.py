"""The shape of the package: where torch is imported, module sizes, one home per idea."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import ROOT, public_modules
from mumoe import FORMATS, Network, preset
from mumoe.gating import ACTIVATIONS, NORMALIZATIONS
from mumoe.presets import preset_format

PACKAGE = ROOT / "mumoe"
#: Where torch may be imported (the torch modules, the reference drop-in, the demo).
TORCH_HOMES = ("nn/", "compat.py", "demo/")


def imported_modules(path):
    """Top-level names of every module a file imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_torch_is_imported_only_under_nn_compat_and_demo():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "torch" in imported_modules(path)
        and not str(path.relative_to(PACKAGE)).startswith(TORCH_HOMES)
    ]
    assert offenders == []


def test_every_torch_free_module_imports_without_torch():
    torch_free = [
        m for m in public_modules()
        if not m.startswith(("mumoe.nn", "mumoe.compat", "mumoe.demo", "mumoe.plotting"))
    ]  # fmt: skip
    code = (
        "import sys, importlib; sys.modules['torch'] = None\n"  # `import torch` fails
        f"for name in {torch_free!r}:\n"
        "    importlib.import_module(name)\n"
        "import numpy as np, mumoe\n"  # and the core computes
        "net = mumoe.cp(4, 3, 2, rank=2)\n"
        "y = mumoe.forward(net, mumoe.random_cores(net), np.ones((2, 3)), np.ones((2, 4)))\n"
        "print(y.shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 2)"


def test_no_module_is_longer_than_550_lines():
    lengths = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert lengths and {name: n for name, n in lengths.items() if n > 550} == {}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_a_format_record_and_its_preset_agree(name, levels):
    record = FORMATS[name]
    rank = {} if not record.has_rank else {"rank": 2}
    net = preset(name, [3] * levels, 4, 5, **rank)
    assert net.spec == record.spec(levels)
    assert net.format == preset_format(net) == name
    # The same spec written by hand is the same format.
    assert Network(record.spec(levels), [3] * levels, 4, 5, **rank).format == name
    assert len(record.init(net)) == net.n_cores
    if record.free_rank is not None:
        assert preset(name, [3] * levels, 4, 5, rank=record.free_rank(levels, 2, 5)).n_params


def test_a_custom_spec_has_the_custom_format():
    net = Network("n i r, r o", 4, 3, 2, rank=2)
    assert net.format == "custom" and preset_format(net) is None


def test_the_torch_kernels_cover_the_gate_vocabulary():
    pytest.importorskip("torch", reason="torch is not installed")
    from mumoe.nn.gating import NORMALIZATIONS as TORCH_NORMALIZATIONS
    from mumoe.nn.gating import TORCH_KERNELS

    assert TORCH_KERNELS.keys() == ACTIVATIONS.keys()
    assert TORCH_NORMALIZATIONS is NORMALIZATIONS
