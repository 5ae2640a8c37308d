"""Helpers the tests share: the backend matrix, torch parameters at random, the import graph.

Imported as ``tests.helpers``; fixtures and hooks live in the root ``conftest.py``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tensorly as tl

from mumoe.backends import declared_backends, unavailable_reason

ROOT = Path(__file__).resolve().parent.parent

BACKENDS = declared_backends()
AVAILABLE = [b.name for b in BACKENDS if unavailable_reason(b) is None]


def backend_params(differentiable: bool = False) -> list[Any]:
    """``pytest.param`` per declared backend, skipped with a reason where unusable."""
    params = []
    for spec in BACKENDS:
        if differentiable and not spec.differentiable:
            continue
        reason = unavailable_reason(spec)
        marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
        if spec.device == "cuda":
            marks.append(pytest.mark.gpu)
        if spec.jit:  # every new shape compiles (JAX): seconds a test
            marks.append(pytest.mark.slow)
        params.append(pytest.param(spec.name, marks=marks, id=spec.name))
    return params


def backend_dtype_params() -> list[Any]:
    """``pytest.param`` per (backend, dtype) declared in ``mumoe/backends/``."""
    params = []
    for spec, param in zip(BACKENDS, backend_params(), strict=True):
        for dtype in spec.dtypes:
            params.append(
                pytest.param((spec.name, dtype), marks=param.marks, id=f"{spec.name}-{dtype}")
            )
    return params


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the active TensorLy backend, then restore the previous one."""
    previous = tl.get_backend()
    tl.set_backend(name)
    try:
        yield
    finally:
        tl.set_backend(previous)


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no leading underscore."""
    import mumoe

    found = ["mumoe"]
    for info in pkgutil.walk_packages(mumoe.__path__, "mumoe."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return sorted(found)


def randomise(
    module: Any, seed: int = 0, *, scale: float = 1.0, normal: bool = False, only: str = ""
) -> Any:
    """Random values in a torch module's parameters (whose names contain ``only``), in place.

    Uniform in [-scale, scale), or normal with standard deviation ``scale``:
    gate projections start at zero and levels past the first at ones, so a
    module straight from its constructor hides many mistakes.  Returns the
    module.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only not in name:
                continue
            if normal:
                values = torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale
            else:
                values = torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 * scale - scale
            p.copy_(values)
    return module


def has_modules(*names: str) -> bool:
    """Whether every one of ``names`` can be imported here."""
    return all(importlib.util.find_spec(name) is not None for name in names)


# ------------------------------------------------------------------ the import graph


@dataclass
class ImportGraph:
    """The modules of a package and the imports between them, as read from their source.

    ``arrows[a]`` holds every module of the package that ``a`` imports, at
    module level, inside a function (lazily) or under ``TYPE_CHECKING``; an
    import of a package runs its ``__init__``, an import of a submodule
    (``from mumoe.gates import entmax``) only that submodule.
    """

    modules: dict[str, Path]
    arrows: dict[str, set[str]] = field(default_factory=dict)
    lazy: dict[str, set[str]] = field(default_factory=dict)

    def loops(self) -> list[list[str]]:
        """The strongly connected groups of two or more modules (Tarjan), each sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.arrows.get(v, ())):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

        for v in sorted(self.modules):
            if v not in index:
                visit(v)
        return found

    def levels(self) -> int:
        """The length of the longest import chain (a loop counts as one module)."""
        group = {m: tuple(g) for g in self.loops() for m in g}
        memo: dict[Any, int] = {}

        def depth(m: str) -> int:
            key = group.get(m, m)
            if key in memo:
                return memo[key]
            memo[key] = 1
            members = key if isinstance(key, tuple) else (key,)
            below = [w for v in members for w in self.arrows.get(v, ()) if group.get(w, w) != key]
            memo[key] = 1 + max((depth(w) for w in below), default=0)
            return memo[key]

        return max((depth(m) for m in self.modules), default=0)

    def n_arrows(self) -> int:
        """The number of arrows (module ``a`` imports module ``b``)."""
        return sum(len(targets) for targets in self.arrows.values())


def import_graph(package: Path, name: str = "mumoe") -> ImportGraph:
    """Read the import graph of the package at ``package`` (a folder), named ``name``."""
    modules: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = ImportGraph(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        lazy: set[str] = set()
        for node in ast.walk(tree):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = module.split(".")[: None if is_package else -1]
                    parent = parent[: len(parent) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.append(sub if sub in modules else base)
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.split(".")[0] == name and target and target != module:
                    targets.add(target)
                    if id(node) not in top:
                        lazy.add(target)
        graph.arrows[module] = targets
        graph.lazy[module] = lazy
    return graph
