"""``mumoe demo``, the main job, in its fast mode: it trains, reports, edits, draws and writes JSON.

The demo runs once through the command line (two seeds in two worker
processes) and once more from Python (one process, another torch thread
count in the caller): the two must write the same JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest

pytest.importorskip("torch", reason="the demo trains torch modules (pip install torch)")
pytest.importorskip("sklearn", reason="the demo's data (pip install 'mumoe[demo]')")
pytest.importorskip("matplotlib", reason="the demo's figures (pip install 'mumoe[demo]')")
pytest.importorskip("tqdm", reason="the demo's progress bars (pip install 'mumoe[demo]')")

import torch

from mumoe.cli import FAST_EPOCHS, FAST_EXPERTS, main
from mumoe.demo import DemoResult, EditResult, HeadResult, run
from mumoe.demo._figures import plot_edit, plot_trend
from mumoe.demo._report import print_report

PNG = b"\x89PNG\r\n\x1a\n"
SEEDS, EDIT_CLASS = [3, 4], 1


@pytest.mark.slow
def test_the_command_trains_reports_edits_draws_and_writes_the_same_json_for_any_threads(
    tmp_path,
):
    printed = io.StringIO()
    rng = torch.get_rng_state()
    argv = [
        "demo",
        "--fast",
        "--no-progress",
        "--seeds",
        "3,4",
        "--edit-class",
        str(EDIT_CLASS),
        "--threads",
        "2",
        "--output",
        str(tmp_path / "cli"),
        "--json",
        str(tmp_path / "cli.json"),
    ]
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    assert torch.equal(torch.get_rng_state(), rng), "the demo changed torch's global RNG"
    report = printed.getvalue()
    written = json.loads((tmp_path / "cli.json").read_text())
    check_the_report(report, written)
    check_the_json(written)
    check_the_figures(tmp_path / "cli")
    assert "trained in 2 processes, one torch thread each" in report

    # The same seeds in this process, one head after another, with the caller at
    # two torch threads: the same numbers, and the caller's thread count restored.
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        again = run(
            experts=FAST_EXPERTS,
            epochs=FAST_EPOCHS,
            seeds=SEEDS,
            edit_class=EDIT_CLASS,
            threads=1,
            progress=False,
            output=None,
            stream=io.StringIO(),
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert again.figures == []
    assert again.to_json() == written


def check_the_report(printed, written):
    for row in ("linear ", *(f"cp N={n} " for n in FAST_EXPERTS)):
        assert row in printed
    assert "Mean ± standard deviation over 2 seeds (3, 4)" in printed
    for head in written["heads"]:
        mean, sd = np.mean(head["accuracy"]), np.std(head["accuracy"], ddof=1)
        assert f"{mean:.3f} ± {sd:.3f}" in printed
    assert f"of their gate mass from one digit: digit {EDIT_CLASS}." in printed


def check_the_json(written):
    assert written["version"] == 1 and written["seeds"] == SEEDS
    assert written["settings"] == {
        "experts": FAST_EXPERTS,
        "network": "cp",
        "budget": 8,
        "epochs": FAST_EPOCHS,
        "edit_class": EDIT_CLASS,
    }
    linear, *heads = written["heads"]
    assert linear["name"] == "linear" and linear["experts"] is None
    assert (linear["expert_params"], linear["gate_params"], linear["rank"]) == (650, 0, None)
    assert linear["polysemanticity"] is None and linear["experts_counted"] is None
    assert [head["experts"] for head in heads] == FAST_EXPERTS
    for head in written["heads"]:
        assert len(head["accuracy"]) == len(SEEDS) and all(0 <= a <= 1 for a in head["accuracy"])
        assert np.shape(head["class_accuracy"]) == (len(SEEDS), 10)
    for head in heads:
        assert head["gate_params"] == 64 * head["experts"] and head["expert_params"] <= 8 * 650
        assert len(head["polysemanticity"]) == len(SEEDS)
        assert all(p is None or 0 <= p <= np.sqrt(0.9) for p in head["polysemanticity"])
    edit = written["edit"]
    assert edit["experts"] == max(FAST_EXPERTS) and edit["digit"] == [EDIT_CLASS] * len(SEEDS)
    for k in range(len(SEEDS)):
        before, after = np.array(edit["accuracy_before"][k]), np.array(edit["accuracy_after"][k])
        assert before.tolist() == heads[-1]["class_accuracy"][k]
        assert edit["change_on_digit"][k] == after[EDIT_CLASS] - before[EDIT_CLASS]
        if not edit["experts_switched_off"][k]:
            assert after.tolist() == before.tolist()


def check_the_figures(folder):
    names = sorted(p.name for p in folder.iterdir())
    experts = [f"experts_N{n}.png" for n in FAST_EXPERTS]
    assert names == sorted(["edit.png", "polysemanticity.png", *experts])
    for name in names:
        assert (folder / name).read_bytes().startswith(PNG)


def made_up_result(seeds=(0, 1, 2)):
    """A result with known numbers: a seed without an edit, and a change that rounds to -0."""
    s = len(seeds)
    linear = HeadResult(
        "linear",
        0,
        None,
        650,
        0,
        np.full(s, 0.9),
        np.full((s, 10), 0.9),
        np.full(s, np.nan),
        np.zeros(s, int),
    )
    moe = HeadResult(
        "cp N=4",
        4,
        19,
        5135,
        256,
        np.full(s, 0.9) - 1e-4,
        np.full((s, 10), 0.9),
        np.linspace(0.2, 0.4, s),
        np.arange(s) + 2,
    )
    before = np.full(10, 0.9)
    after = before.copy()
    after[3] = 0.5
    edits = [EditResult(seed, 3, [1], 0.7, before, after) for seed in seeds[1:]]
    settings = {"experts": [4], "network": "cp", "budget": 8, "epochs": 1, "edit_class": None}
    return DemoResult(list(seeds), [linear, moe], settings, 4, [None, *edits])


def test_the_report_gives_mean_and_spread_and_says_where_nothing_was_edited():
    printed = io.StringIO()
    print_report(made_up_result(), printed)
    text = printed.getvalue()
    assert (
        "cp N=4  19    5,135 + 256          0.900 ± 0.000  +0.000 ± 0.000  0.300 ± 0.100    2-4/4"
        in text
    )
    assert "-0.000" not in text
    assert "0     -      0        -      no expert tied to a digit" in text
    assert "on the edited digit: -0.400 ± 0.000; on the others: +0.000 ± 0.000" in text
    assert "(mean ± standard deviation over 2 seeds (1, 2))." in text
    one = io.StringIO()
    print_report(made_up_result(seeds=(5,)), one)
    assert "One seed (5): no spread is shown" in one.getvalue() and "±" not in one.getvalue()


def test_the_figures_draw_every_seed_and_a_missing_edit(tmp_path):
    result = made_up_result()
    for plot, name in ((plot_trend, "trend.png"), (plot_edit, "edit.png")):
        assert plot(result, tmp_path / name).read_bytes().startswith(PNG)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experts", "4", "4"], "experts must be different expert counts, got [4, 4]"),
        (["--seeds", "0,0"], "seeds must be different non-negative integers, got [0, 0]"),
        (["--seeds", "-1"], "seeds must be different non-negative integers, got [-1]"),
        (["--edit-class", "12"], "edit_class must be a digit 0-9, got 12"),
    ],
)
def test_bad_options_are_refused_with_the_reason(tmp_path, capsys, argv, message):
    assert main(["demo", "--no-progress", "--output", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--experts", "--epochs", "--threads", "--budget"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_counts_that_are_not_positive_are_refused_by_the_parser(capsys, option, value):
    # Issue #26, item 12: --budget -3 was reported as "-1950" (the budget in parameters).
    with pytest.raises(SystemExit) as exit_:
        main(["demo", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected a positive integer, got '{value}'" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"experts": [0]}, "experts must be positive expert counts, got [0]"),
        ({"epochs": -1}, "epochs must be at least 1, got -1"),
        ({"threads": 0}, "threads must be a positive int"),
        ({"budget": -3}, "budget must be a positive int, got -3"),
    ],
)
def test_run_refuses_counts_that_are_not_positive(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run(output=None, progress=False, **options)


def test_the_progress_bar_is_off_where_stderr_is_not_a_terminal(monkeypatch):
    # Issue #26, item 10: a log file got the bar's every redraw.
    import tqdm.auto

    seen = {}

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            seen["disable"] = kwargs.get("disable")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    run(experts=(4,), epochs=1, seeds=(0,), output=None, threads=1, stream=io.StringIO())
    assert seen["disable"] is None  # tqdm's "off where the stream is not a terminal"


@pytest.mark.parametrize("options", [{"seeds": "0,1"}, {"seeds": [0.5]}, {"experts": 8}])
def test_run_refuses_what_is_not_a_sequence_of_ints(options):
    with pytest.raises(TypeError, match="must be a sequence of ints, got"):
        run(output=None, progress=False, threads=1, **options)


def test_seeds_that_are_not_integers_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--seeds", "0,x"])
    assert exit_.value.code == 2
    assert "expected comma-separated integers such as 0,1,2, got '0,x'" in capsys.readouterr().err


def test_output_paths_are_checked_before_any_training(tmp_path, capsys, monkeypatch):
    # Issue #26, item 6: a bad --json path died with a traceback after every head had
    # trained; an --output naming a file gave a raw FileExistsError.
    import mumoe.demo._experiment as experiment

    monkeypatch.setattr(experiment, "train_head", lambda job: pytest.fail("trained"))
    (tmp_path / "file").write_text("")
    cases = [
        (["--json", str(tmp_path / "no" / "such" / "r.json")], "which is not a folder"),
        (["--json", str(tmp_path)], "is a folder; name a file in it"),
        (["--output", str(tmp_path / "file")], "cannot be made: "),
        (["--output", str(tmp_path / "file" / "below")], "is a file"),
    ]
    for argv, message in cases:
        assert main(["demo", "--no-progress", "--threads", "1", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mumoe demo: error: ") and message in err, err
        assert err.count("\n") == 1  # one line, no traceback
