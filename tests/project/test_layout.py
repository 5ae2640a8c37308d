"""The floor plan: layers import only what lies below them, torch lives in nn/, one home per idea.

The layers, bottom to top (docs/architecture.rst draws them)::

    base        mumoe.typing, mumoe.validation, mumoe.backends
    spec        what W is                     imports base
    plan        how to contract it            imports spec, base
    functional  arrays in, arrays out         imports plan, spec, base
    gates       the gate (beside them)        imports base
    inference   torch-free eval layers        imports functional, gates, plan, spec, base
    nn          torch                         imports every layer above
    edge        the face, analysis, plotting, testing, cli, demo: anything

An arrow is any import of a module of the package by another, at module level,
inside a function or under ``TYPE_CHECKING``; the kernel strings of
``mumoe/backends/*.toml`` are arrows too, checked against the same table.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from mumoe import FORMATS, Network, preset
from mumoe.backends import declared_backends
from mumoe.gates import ACTIVATIONS, NORMALIZATIONS
from mumoe.spec import preset_format
from tests.helpers import ROOT, import_graph, public_modules

PACKAGE = ROOT / "mumoe"

#: Each layer and the packages or modules it consists of (the first match wins).
LAYERS = {
    "base": ("mumoe.typing", "mumoe.validation", "mumoe.backends"),
    "spec": ("mumoe.spec",),
    "plan": ("mumoe.plan",),
    "functional": ("mumoe.functional",),
    "gates": ("mumoe.gates",),
    "inference": ("mumoe.inference",),
    "nn": ("mumoe.nn",),
}
#: The layers each layer may import from (its own included); the edge may import anything.
ALLOWED = {
    "base": {"base"},
    "spec": {"base", "spec"},
    "plan": {"base", "spec", "plan"},
    "functional": {"base", "spec", "plan", "functional"},
    "gates": {"base", "gates"},
    "inference": {"base", "spec", "plan", "functional", "gates", "inference"},
    "nn": {"base", "spec", "plan", "functional", "gates", "inference", "nn"},
}
#: The most modules the top of the package may hold (``mumoe/*.py``).
TOP_MODULES = 12
#: A smoke alarm, not a rule: one idea per module, even a long one.
SOFT_CAP = 800


def layer_of(module: str) -> str:
    """The layer of a module of mumoe (``"edge"`` for the face and the edge modules)."""
    for layer, homes in LAYERS.items():
        if any(module == home or module.startswith(home + ".") for home in homes):
            return layer
    return "edge"


def upward(graph):
    """Every arrow that breaks the layer order, as ``"a -> b"``."""
    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.arrows.items()
        for b in targets
        if layer_of(a) != "edge" and layer_of(b) not in ALLOWED[layer_of(a)]
    )


def test_the_import_graph_has_no_loop():
    assert import_graph(PACKAGE).loops() == []


def test_every_import_follows_the_layer_order():
    assert upward(import_graph(PACKAGE)) == []


def test_the_layer_table_covers_the_package():
    # Every module belongs to a layer or to the edge, which is the package face and a
    # few modules at the top: a new subpackage must be added to LAYERS.
    graph = import_graph(PACKAGE)
    edge = sorted(m for m in graph.modules if layer_of(m) == "edge")
    assert edge == [
        "mumoe",
        "mumoe.__main__",
        "mumoe.analysis",
        "mumoe.cli",
        "mumoe.demo",
        "mumoe.demo._experiment",
        "mumoe.demo._figures",
        "mumoe.demo._lm",
        "mumoe.demo._report",
        "mumoe.demo._results",
        "mumoe.demo._train",
        "mumoe.plotting",
        "mumoe.testing",
    ]


def test_a_module_inside_a_layer_never_imports_its_own_face():
    # ``from mumoe.spec import X`` inside mumoe/spec/ would run the face mid-import.
    graph = import_graph(PACKAGE)
    offenders = [
        f"{a} -> {b}"
        for a, targets in graph.arrows.items()
        for b in targets
        if graph.modules[b].name == "__init__.py" and a.startswith(b + ".")
    ]
    assert offenders == []


def test_the_top_of_the_package_is_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_MODULES, top


def test_no_module_is_longer_than_the_soft_cap():
    lengths = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert lengths and {name: n for name, n in lengths.items() if n > SOFT_CAP} == {}


@pytest.mark.parametrize("declaration", declared_backends(), ids=lambda d: d.name)
def test_kernel_strings_follow_the_layer_order(declaration):
    # The core calls a backend's kernels by name (mumoe.backends.backend_function): an
    # arrow from the torch-free core to the kernel's module.  Kernels of the pytorch
    # backend may live in nn/ (they run only on torch tensors); every other kernel is
    # in a layer the core may import, or in a third-party library.
    core = {"base", "spec", "plan", "functional", "gates"}
    for kind in ("erf", "addmm", "kth_largest", "bias_matmul", "entmax15", "sparsemax", "jit"):
        target = getattr(declaration, kind)
        if not target.startswith("mumoe"):
            continue
        module, _, function = target.partition(":")
        layer = layer_of(module)
        allowed = core | ({"nn"} if declaration.module == "torch" else set())
        assert layer in allowed, f"{declaration.name}.{kind} = {target!r}: layer {layer}"
        assert (PACKAGE.parent / (module.replace(".", "/") + ".py")).exists() or (
            PACKAGE.parent / module.replace(".", "/") / "__init__.py"
        ).exists(), target
        if declaration.module == "numpy" or declaration.module in sys.modules:
            imported = __import__(module, fromlist=[function])
            assert callable(getattr(imported, function)), target


def imported_libraries(path):
    """Top-level names of every module a file imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_torch_is_imported_only_under_nn_and_demo():
    graph = import_graph(PACKAGE)
    offenders = [
        module
        for module, path in graph.modules.items()
        if "torch" in imported_libraries(path)
        and layer_of(module) != "nn"
        and not module.startswith("mumoe.demo")
    ]
    assert offenders == []


def test_every_torch_free_module_imports_without_torch():
    torch_free = [
        m
        for m in public_modules()
        if not m.startswith(("mumoe.nn", "mumoe.demo", "mumoe.plotting"))
    ]
    code = (
        "import sys, importlib; sys.modules['torch'] = None\n"  # `import torch` fails
        f"for name in {torch_free!r}:\n"
        "    importlib.import_module(name)\n"
        "import numpy as np, mumoe\n"  # and the core computes
        "net = mumoe.cp(3, 2, expert_dims=4, rank=2)\n"
        "y = mumoe.forward(net, mumoe.random_cores(net), np.ones((2, 3)), np.ones((2, 4)))\n"
        "print(y.shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 2)"


# --------------------------------------------------------------- one home per idea


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_a_format_record_and_its_preset_agree(name, levels):
    record = FORMATS[name]
    rank = {} if not record.has_rank else {"rank": 2}
    net = preset(name, 4, 5, expert_dims=[3] * levels, **rank)
    legs = (len(net.input_legs), len(net.output_legs))  # ttm splits both by default
    assert net.spec == record.spec(levels, *legs)
    assert net.format == preset_format(net) == name
    # The same spec written by hand is the same format.
    shapes = {"in_shape": net.in_shape, "out_shape": net.out_shape}
    by_hand = Network(record.spec(levels, *legs), 4, 5, expert_dims=[3] * levels, **rank, **shapes)
    assert by_hand.format == name
    assert len(record.init(net.core_legs, net.sizes, net.in_features)) == net.n_cores
    if record.free_rank is not None:
        assert preset(
            name, 4, 5, expert_dims=[3] * levels, rank=record.free_rank(levels, 2, 5, *legs)
        ).n_params


def test_a_custom_spec_has_the_custom_format():
    net = Network("n i r, r o", 3, 2, expert_dims=4, rank=2)
    assert net.format == "custom" and preset_format(net) is None


def test_the_torch_kernels_cover_the_gate_vocabulary():
    pytest.importorskip("torch", reason="torch is not installed")
    from mumoe.nn import TORCH_KERNELS, _gate

    assert TORCH_KERNELS.keys() == ACTIVATIONS.keys()
    from mumoe.gates import HIDDEN_ACTIVATIONS
    from mumoe.nn import TORCH_HIDDEN_ACTIVATIONS

    assert TORCH_HIDDEN_ACTIVATIONS.keys() == HIDDEN_ACTIVATIONS.keys()
    assert _gate.NORMALIZATIONS is NORMALIZATIONS
