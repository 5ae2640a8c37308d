"""The README's examples run and its printed output is what the code prints."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, use_backend

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


def test_the_demo_table_and_sentences_are_the_stored_default_run():
    """The README shows what ``mumoe demo`` printed for docs/_static/demo/results.json.

    CI runs the demo again and says whether this machine gives the same file.
    """
    import io
    import json

    from mumoe.demo._report import print_report
    from mumoe.demo._results import DemoResult, mean_sd

    stored = json.loads((ROOT / "docs" / "_static" / "demo" / "results.json").read_text())
    assert stored["seeds"] == [0, 1, 2]
    assert stored["settings"] == {
        "experts": [8, 32, 128, 512],
        "network": "cp",
        "budget": 8,
        "epochs": 40,
        "edit_class": None,
    }
    result = DemoResult.from_json(stored)
    printed = io.StringIO()
    print_report(result, printed)
    lines = printed.getvalue().splitlines()
    first = next(k for k, line in enumerate(lines) if line.startswith("head "))
    last = next(k for k, line in enumerate(lines) if line.startswith("  (mean ±"))
    assert "```\n" + "\n".join(lines[first : last + 1]) + "\n```" in README

    def pm(values, digits):
        mean, sd = mean_sd(values)
        return f"{mean:.{digits}f} ± {sd:.{digits}f}"

    heads = {head.n_experts: head for head in result.heads}
    edits = [edit for edit in result.edits if edit is not None]
    digits = [e.digit for e in edits]
    shares = [round(100 * e.share) for e in edits]
    for claim in (
        f"falls from {pm(heads[8].polysemanticity, 2)} at\n  N = 8 to "
        f"{pm(heads[512].polysemanticity, 2)} at N = 512",
        f"linear head's {pm(heads[0].accuracy, 3)}",
        f"falls by {pm([-e.change_on_digit for e in edits], 3)}",
        f"moves by +{pm([e.change_on_others for e in edits], 3)}",
        f"(digit {digits[0]} in all three seeds; {min(shares)}-{max(shares)}% of it)"
        if len(set(digits)) == 1
        else "(digits " + ", ".join(map(str, digits[:-1])) + f" and {digits[-1]};",
    ):
        assert claim in README
    # Polysemanticity "falls from 8 to 32 to 128 experts in every seed; from 128 to 512 it
    # falls in two seeds and rises in one (seed 0, from 0.09 to 0.15)".
    poly = np.array([heads[n].polysemanticity for n in (8, 32, 128, 512)])
    assert (np.diff(poly[:3], axis=0) < 0).all()
    rises = np.flatnonzero(poly[3] > poly[2])
    assert rises.tolist() == [0]
    assert f"(seed 0, from\n  {poly[2, 0]:.2f} to {poly[3, 0]:.2f})" in README
    # "within 0.011 of the linear head's"; only N=128 ahead in every seed, by how much; the
    # 512-expert head's differences, seed by seed; the images lost per seed.
    assert all(abs(h.accuracy.mean() - heads[0].accuracy.mean()) <= 0.011 for h in heads.values())
    ahead = [n for n, h in heads.items() if n and (h.accuracy > heads[0].accuracy).all()]
    assert ahead == [128]
    gains = heads[128].accuracy - heads[0].accuracy
    images = ", ".join(str(round(g * 450)) for g in gains[:-1]) + f" and {round(gains[-1] * 450)}"
    listed = ", ".join(f"{d:+.3f}" for d in gains[:-1]) + f" and {gains[-1]:+.3f}"
    assert f"(by {listed}: {images}\n  images)" in README
    differences = heads[512].accuracy - heads[0].accuracy
    listed = ", ".join(f"{d:+.3f}" for d in differences[:-1])
    assert f"by\n  {listed} and {differences[-1]:+.3f} in the three seeds" in README
    lost = [round(-(e.after - e.before)[e.digit] * 45) for e in edits]
    assert f"({', '.join(map(str, lost[:-1]))} and {lost[-1]} of its 44-45 test images)" in README
