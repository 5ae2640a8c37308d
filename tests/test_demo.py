"""``mumoe demo``, the main job, in its fast mode: it trains, reports, edits and draws."""

from __future__ import annotations

import numpy as np
import pytest

for _module in ("torch", "sklearn", "matplotlib", "tqdm"):
    pytest.importorskip(
        _module, reason=f"{_module} is not installed (pip install 'mumoe[torch,demo]')"
    )

import torch  # noqa: E402

from mumoe.cli import main  # noqa: E402
from mumoe.demo import run  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_command_trains_reports_and_draws(tmp_path, capsys):
    status = main(["demo", "--fast", "--no-progress", "--edit-class", "1",
                   "--output", str(tmp_path / "out")])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    for row in ("linear ", "cp N=4 ", "cp N=16 "):
        assert row in printed
    assert "Edit: in the N=16 head, switch off the" in printed
    assert "digit 1:" in printed
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["edit.png", "experts_N16.png", "experts_N4.png", "polysemanticity.png"]
    for name in names:
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG)


def test_the_same_seed_gives_the_same_numbers_and_leaves_torch_rng_alone(tmp_path):
    state = torch.get_rng_state()
    options = {"experts": (3, 6), "epochs": 2, "progress": False, "edit_class": 0}
    first = run(seed=3, output=tmp_path / "a", **options)
    assert torch.equal(torch.get_rng_state(), state)
    second = run(seed=3, output=tmp_path / "b", **options)
    for a, b in zip(first.heads, second.heads, strict=True):
        assert (a.name, a.rank, a.accuracy) == (b.name, b.rank, b.accuracy)
        np.testing.assert_array_equal(a.class_accuracy, b.class_accuracy)
        if a.histogram is not None:
            np.testing.assert_array_equal(a.histogram, b.histogram)
    assert first.edited_experts == second.edited_experts
    np.testing.assert_array_equal(first.accuracy_after, second.accuracy_after)


def test_the_result_holds_what_the_table_prints(tmp_path):
    result = run(experts=(4,), epochs=2, progress=False, output=tmp_path)
    linear, head = result.heads
    assert (linear.n_experts, linear.expert_params, linear.gate_params) == (0, 650, 0)
    assert head.n_experts == 4 and head.gate_params == 64 * 4
    assert head.expert_params <= 8 * 650
    assert head.histogram.shape == (4, 10)
    assert 0 <= head.accuracy <= 1 and head.class_accuracy.shape == (10,)
    assert 0 <= head.polysemanticity <= np.sqrt(0.9) or head.experts_counted == 0


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
