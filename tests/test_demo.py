"""``mumoe demo``, the main job, in its fast mode: it trains, reports, edits and draws.

The demo is trained once through the command line and once more to check
that a seed gives the same numbers, in one test (one pytest-xdist worker).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

for _module in ("torch", "sklearn", "matplotlib", "tqdm"):
    pytest.importorskip(
        _module, reason=f"{_module} is not installed (pip install 'mumoe[torch,demo]')"
    )

import torch  # noqa: E402

import mumoe.demo  # noqa: E402
from mumoe.cli import FAST_EPOCHS, FAST_EXPERTS, main  # noqa: E402
from mumoe.demo import run  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
SEED, EDIT_CLASS = 3, 1


def test_the_command_trains_reports_edits_draws_and_repeats_itself(tmp_path):
    """``mumoe demo --fast`` once through the command line, then again from Python."""
    results, real = [], mumoe.demo.run

    def recording(**options):
        results.append(real(**options))
        return results[-1]

    printed = io.StringIO()
    rng = torch.get_rng_state()
    argv = ["demo", "--fast", "--no-progress", "--seed", str(SEED),
            "--edit-class", str(EDIT_CLASS), "--output", str(tmp_path / "cli")]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(mumoe.demo, "run", recording)  # the command imports it when run
        assert main(argv) == 0
    assert torch.equal(torch.get_rng_state(), rng), "the demo changed torch's global RNG"
    (first,) = results
    check_the_report(printed.getvalue(), first)
    check_the_figures(tmp_path / "cli")

    # The same seed gives the same numbers (no figures this time: output=None).
    second = run(experts=FAST_EXPERTS, epochs=FAST_EPOCHS, seed=SEED, edit_class=EDIT_CLASS,
                 progress=False, output=None, stream=io.StringIO())  # fmt: skip
    assert second.figures == []
    for a, b in zip(first.heads, second.heads, strict=True):
        assert (a.name, a.rank, a.accuracy) == (b.name, b.rank, b.accuracy)
        np.testing.assert_array_equal(a.class_accuracy, b.class_accuracy)
        if a.histogram is not None:
            np.testing.assert_array_equal(a.histogram, b.histogram)
    assert first.edited_experts == second.edited_experts
    np.testing.assert_array_equal(first.accuracy_after, second.accuracy_after)


def check_the_report(printed, result):
    for row in ("linear ", *(f"cp N={n} " for n in FAST_EXPERTS)):
        assert row in printed
    assert f"Edit: in the N={max(FAST_EXPERTS)} head, switch off the" in printed
    assert f"digit {EDIT_CLASS}:" in printed
    linear, *heads = result.heads
    assert (linear.n_experts, linear.expert_params, linear.gate_params) == (0, 650, 0)
    assert [head.n_experts for head in heads] == FAST_EXPERTS
    for head in heads:
        assert head.gate_params == 64 * head.n_experts
        assert head.expert_params <= 8 * 650
        assert head.histogram.shape == (head.n_experts, 10)
        assert 0 <= head.accuracy <= 1 and head.class_accuracy.shape == (10,)
        assert 0 <= head.polysemanticity <= np.sqrt(0.9) or head.experts_counted == 0
        assert f"{head.accuracy:.3f}" in printed


def check_the_figures(folder):
    names = sorted(p.name for p in folder.iterdir())
    experts = [f"experts_N{n}.png" for n in FAST_EXPERTS]
    assert names == sorted(["edit.png", "polysemanticity.png", *experts])
    for name in names:
        assert (folder / name).read_bytes().startswith(PNG)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experts", "0"], "experts must be positive expert counts, got [0]"),
        (["--edit-class", "12"], "edit_class must be a digit 0-9, got 12"),
        (["--epochs", "-1"], "epochs must be at least 1, got -1"),
    ],
)
def test_bad_options_are_refused_with_the_reason(tmp_path, capsys, argv, message):
    assert main(["demo", "--no-progress", "--output", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_numbers_do_not_depend_on_the_machines_thread_count():
    # The demo trains with one torch thread whatever the caller set (issue #16, items 2-3),
    # and puts the caller's setting back.
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            report = io.StringIO()
            results.append(run(experts=[4], epochs=2, seed=1, edit_class=0, progress=False,
                               output=None, stream=report))  # fmt: skip
            assert torch.get_num_threads() == threads
            assert report.getvalue().rstrip().endswith("(1 torch thread).")
    finally:
        torch.set_num_threads(previous)
    first, second = results
    for a, b in zip(first.heads, second.heads, strict=True):
        assert a.accuracy == b.accuracy
        np.testing.assert_array_equal(a.class_accuracy, b.class_accuracy)
    np.testing.assert_array_equal(first.accuracy_after, second.accuracy_after)
    with pytest.raises(TypeError, match="threads must be a positive int"):
        run(experts=[4], epochs=1, progress=False, output=None, threads=0.5)
