"""The API reference lists every public name of every public module, and nothing stale."""

from __future__ import annotations

import importlib
import inspect
import re
import typing

import pytest

from tests.helpers import ROOT, public_modules

API = (ROOT / "docs" / "api.rst").read_text()


def documented() -> dict[str, object]:
    """The objects of api.rst's autosummary tables, by qualified name."""
    entries, module = {}, None
    for line in API.splitlines():
        if match := re.match(r"\.\. currentmodule:: (\S+)", line):
            module = match.group(1)
        elif module and (match := re.match(r"   ([A-Za-z_][\w.]*)$", line)):
            path = f"{module}.{match.group(1)}"
            entries[path] = resolve(path)
    return entries


def resolve(path: str) -> object:
    """The object at a dotted path, importing submodules on the way."""
    parts = path.split(".")
    obj: object = importlib.import_module(parts[0])
    for k, part in enumerate(parts[1:], 2):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:k]))
    return obj


def is_api(obj: object) -> bool:
    """Functions and classes are documented; constants and type aliases are not."""
    return (inspect.isclass(obj) or inspect.isfunction(obj)) and obj is not typing.Any


def test_the_package_is_discovered():
    modules = public_modules()
    assert {"mumoe.spec", "mumoe.nn", "mumoe.functional", "mumoe.inference"} <= set(modules)
    assert not any("._" in name for name in modules)


@pytest.mark.parametrize("module", public_modules())
def test_every_public_name_is_in_the_api_reference(module):
    pytest.importorskip("torch", reason="the reference documents the torch modules too")
    pytest.importorskip("matplotlib", reason="mumoe.plotting needs matplotlib")
    pytest.importorskip("sklearn", reason="mumoe.demo's docs need scikit-learn")
    imported = importlib.import_module(module)
    listed = {id(obj) for obj in documented().values()}
    missing = [
        f"{module}.{name}"
        for name in getattr(imported, "__all__", ())
        if is_api(obj := getattr(imported, name)) and id(obj) not in listed
    ]
    assert not missing, f"add to docs/api.rst: {missing}"


def test_every_entry_of_the_api_reference_exists():
    pytest.importorskip("torch", reason="the reference documents the torch modules too")
    pytest.importorskip("matplotlib", reason="mumoe.plotting needs matplotlib")
    assert documented()


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_no_tutorial_cell_ends_in_an_expression_whose_repr_is_printed(path):
    # sphinx-gallery prints the repr of a cell's last expression: a bare
    # ``ax.legend(...)`` or ``draw_network(...)`` renders "<Figure size 700x320 ...>"
    # (issue #19).  Assign it (``_ = ...``) or print what is meant to be shown.
    import ast

    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    starts = [k + 1 for k, line in enumerate(lines) if line.startswith("# %%")]
    bounds = zip(starts, [*starts[1:], len(lines) + 1], strict=True)
    offenders = []
    for first, end in bounds:
        body = [node for node in tree.body if first <= node.lineno < end]
        last = body[-1] if body else None
        if isinstance(last, ast.Expr) and not (
            isinstance(last.value, ast.Call) and getattr(last.value.func, "id", "") == "print"
        ):
            offenders.append(f"line {last.lineno}: {ast.unparse(last)[:60]}")
    assert not offenders, f"{path.name}: cells end in an expression whose repr prints: {offenders}"


def test_the_architecture_page_matches_the_tree():
    # Every module is on the page (by its path, or its folder's), and every path the page
    # names exists: the page is the map of the package, kept true by this test.
    page = (ROOT / "docs" / "architecture.rst").read_text()
    named = set(re.findall(r"``(mumoe/[\w/]*(?:\.py)?)``", page))
    assert named, "the page names no module"

    def listed(path):
        relative = path.relative_to(ROOT)
        folders = [str(parent) + "/" for parent in relative.parents if str(parent) != "."]
        return str(relative) in named or any(folder in named for folder in folders)

    missing = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "mumoe").rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py") and not listed(path)
    ]
    assert missing == [], f"add to docs/architecture.rst: {missing}"
    stale = [name for name in named if not (ROOT / name).exists()]
    assert stale == [], f"docs/architecture.rst names what does not exist: {stale}"


def _words(path: str) -> str:
    """A page's text with its line breaks and indentation folded into single spaces."""
    return " ".join((ROOT / path).read_text().split())


def test_the_pages_tell_one_story():
    # Issue #26, item 10: pages that disagreed with each other or with the code.
    readme, install = _words("README.md"), _words("docs/install.rst")
    cpu_index = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    for page in (readme, install):  # torch==2.13.0 is the CI machines' wheel, not "the CPU one"
        assert cpu_index in page
        assert "for the CPU wheel" not in page
    theory, networks = _words("docs/theory/index.rst"), _words("docs/networks.rst")
    for page in (theory, networks):  # who finds the path: mumoe's search, then opt_einsum's
        assert "mumoe.plan.FlopOptimal" in page and '"auto-hq"' in page
        assert "asks opt_einsum for a path" not in page
        assert "searches a contraction path with opt_einsum" not in page
    toml = (ROOT / "mumoe" / "backends" / "jax.toml").read_text()
    for page in (install, toml):  # tensorly's JAX backend turns x64 on
        assert "float32 unless" not in page and "jax_enable_x64" in page
