"""The README's examples run and its printed output is what the code prints."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT, use_backend

README = (ROOT / "README.md").read_text()


def test_quickstart_names_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in README
    assert ci.strip().splitlines()[-1] == "python -m pytest"


@pytest.mark.parametrize("block", re.findall(r"```python\n(.*?)```", README, re.S))
def test_python_examples_run(block, tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the README examples use torch")
    monkeypatch.chdir(tmp_path)  # files the examples write land here
    with use_backend("numpy"):
        exec(compile(block, "README.md", "exec"), {})


def test_describe_output_is_current():
    command = re.search(r'^python -c "(.*)"$', README, re.M).group(1)
    shown = re.search(r"```\n(Network 'cp'.*?)```", README, re.S).group(1)
    printed = subprocess.run(
        [sys.executable, "-c", command], capture_output=True, text=True, check=True
    ).stdout
    assert printed == shown
