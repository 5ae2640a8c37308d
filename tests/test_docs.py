"""The API reference lists every public name of the package."""

from __future__ import annotations

import importlib
import re

import pytest

from conftest import ROOT

API = (ROOT / "docs" / "api.rst").read_text()
MODULES = [
    "mumoe",
    "mumoe.analysis",
    "mumoe.backend",
    "mumoe.compat",
    "mumoe.contraction",
    "mumoe.demo",
    "mumoe.gating",
    "mumoe.inference",
    "mumoe.matching",
    "mumoe.nn",
    "mumoe.plotting",
    "mumoe.testing",
]


def documented() -> set[str]:
    """Fully qualified names in api.rst's autosummary tables."""
    names, module = set(), None
    for line in API.splitlines():
        if match := re.match(r"\.\. currentmodule:: (\S+)", line):
            module = match.group(1)
        elif module and (match := re.match(r"   ([A-Za-z_][\w.]*)$", line)):
            names.add(f"{module}.{match.group(1)}")
    return names


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_is_in_the_api_reference(module):
    pytest.importorskip("torch", reason="the reference documents the torch modules too")
    pytest.importorskip("matplotlib", reason="mumoe.plotting needs matplotlib")
    public = importlib.import_module(module).__all__
    constants = {name for name in public if name.isupper() or name.startswith("__")}
    missing = {f"{module}.{name}" for name in public} - documented()
    missing -= {f"{module}.{name}" for name in constants}
    assert not missing, f"add to docs/api.rst: {sorted(missing)}"
