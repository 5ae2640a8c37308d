"""``mumoe demo lm`` (issue #27, item 6): the smoke run, the options, the stored run."""

from __future__ import annotations

import io
import json

import pytest

from tests.helpers import ROOT

pytest.importorskip("torch", reason="mumoe demo lm needs torch")
pytest.importorskip("transformers", reason="mumoe demo lm needs transformers")
pytest.importorskip("matplotlib", reason="mumoe demo lm draws with matplotlib")

from mumoe.cli import main
from mumoe.demo._lm import report_lm

STORED = ROOT / "docs" / "_static" / "demo" / "lm.json"


@pytest.mark.slow
def test_the_fast_run_trains_decomposes_reports_draws_and_writes(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "lm",
                "--fast",
                "--seeds",
                "0,1",
                "--output",
                str(tmp_path),
                "--json",
                str(tmp_path / "lm.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "lm.json").read_text())
    assert result["fast"] and result["seeds"] == [0, 1]
    assert abs(result["exact_start"]["delta_ce"]) < 1e-4  # the exact start, float32
    kinds = ("mxd", "mxd-scratch", "transcoder")
    assert {(r["kind"], r["seed"]) for r in result["frontier"]} == {
        (kind, seed) for kind in kinds for seed in (0, 1)
    }
    mxd, scratch, transcoder = result["summary"]  # one k in the fast run
    assert mxd["params"] == scratch["params"] >= transcoder["params"]
    assert mxd["l0"] <= mxd["k"] and transcoder["l0"] <= transcoder["k"]
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert "(the exact start)" in out and "frontier (mean ± sd over seeds 0,1)" in out


def test_digits_options_are_refused_for_lm(capsys):
    assert main(["demo", "lm", "--experts", "8"]) == 2
    assert "--experts are options of the digits demo, not of 'lm'" in capsys.readouterr().err


def test_output_paths_are_checked_before_training(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("")
    assert main(["demo", "lm", "--fast", "--output", str(afile / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_the_readme_shows_the_stored_full_run():
    stored = json.loads(STORED.read_text())
    assert stored["seeds"] == [0, 1, 2] and not stored["fast"]
    printed = io.StringIO()
    report_lm(stored, printed)
    readme = (ROOT / "README.md").read_text()
    assert "```\n" + printed.getvalue() + "```" in readme
