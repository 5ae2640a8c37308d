"""The command line: ``mumoe backends`` and ``mumoe describe``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mumoe
from mumoe import FORMATS, describe, tr
from mumoe.cli import main


def test_backends_lists_every_declaration_and_why_one_is_unusable(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["numpy"].split()[1] == "yes"
    assert "cupy" in lines and ("yes" in lines["cupy"] or "no: " in lines["cupy"])
    assert "tensorly.set_backend" in out


def test_describe_a_preset_matches_the_network(capsys):
    argv = [
        "describe",
        "tr",
        "--expert-dims",
        "32",
        "4",
        "--in-features",
        "768",
        "--out-features",
        "1000",
        "--rank",
        "4",
        "4",
        "4",
        "64",
        "--batch",
        "256",
    ]
    assert main(argv) == 0
    expected = describe(tr(768, 1000, expert_dims=(32, 4), rank=(4, 4, 4, 64)), batch_size=256)
    assert capsys.readouterr().out.strip() == expected


def test_describe_a_spec_with_named_bonds(capsys):
    argv = [
        "describe",
        "n1 a, a n2 b, i b c, o c",
        "--expert-dims",
        "8",
        "4",
        "--in-features",
        "16",
        "--out-features",
        "10",
        "--rank",
        "a=3",
        "b=5",
        "c=5",
        "--no-bias",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Network 'custom': 2 expert levels, 8 x 4 = 32 experts, no bias" in out
    assert "a=3, b=5, c=5" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "describe",
                "n r, i r, o q",
                "--expert-dims",
                "8",
                "--in-features",
                "4",
                "--out-features",
                "2",
                "--rank",
                "3",
            ],
            "bond 'q' appears only in core 2",
        ),
        (
            ["describe", "cp", "--expert-dims", "8", "--in-features", "4", "--out-features", "2"],
            "the cp network needs a rank",
        ),
        (
            [
                "describe",
                "tr",
                "--expert-dims",
                "8",
                "--in-features",
                "4",
                "--out-features",
                "2",
                "--rank",
                "2",
                "3",
                "2",
                "5",
            ],
            r"TR ranks must close the ring",
        ),
        (
            [
                "describe",
                "dense",
                "--expert-dims",
                "8",
                "--in-features",
                "4",
                "--out-features",
                "2",
                "--rank",
                "3",
            ],
            "the dense format has no rank, got rank=3",
        ),
        (
            [
                "describe",
                "cp",
                "--expert-dims",
                "8",
                "--in-features",
                "4",
                "--out-features",
                "2",
                "--rank",
                "x",
            ],
            "--rank must be an int, got 'x'",
        ),
        (
            ["describe", "cp", "--in-features", "4", "--out-features", "2", "--rank", "3"],
            "needs --expert-dims",
        ),
        (
            [
                "describe",
                "n r, i r, o r",
                "--expert-dims",
                "8",
                "--in-features",
                "4",
                "--out-features",
                "2",
                "--rank",
                "same",
            ],
            "chooses the rank of a format only",
        ),
    ],
)
def test_bad_networks_exit_2_with_the_reason(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_describe_takes_a_budget(capsys):
    argv = ["describe", "cp", "--in-features", "768", "--out-features", "1000", "--rank", "same"]
    assert main([*argv, "--expert-dims", "128"]) == 0
    assert "r=353" in capsys.readouterr().out  # the parameters of nn.Linear(768, 1000)


def test_the_jax_note_is_what_tensorly_does(capsys):
    # Issue #26, item 10: the docs said JAX computes in float32 unless JAX_ENABLE_X64 is set.
    pytest.importorskip("jax", reason="the note is JAX's (pip install 'mumoe[jax]')")
    assert main(["backends"]) == 0
    assert "jax: TensorLy's set_backend('jax') turns on jax_enable_x64" in capsys.readouterr().out
    probe = (
        "import tensorly as tl; tl.set_backend('jax'); import jax, jax.numpy as jnp, numpy as np;"
        "print(jax.config.jax_enable_x64, tl.tensor(np.zeros(2)).dtype, jnp.zeros(2).dtype)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.split() == ["True", "float64", "float64"], result.stderr


def test_version(capsys):
    # Issue #26, item 10: `mumoe --version` was an error.
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mumoe {mumoe.__version__}"


def test_describe_help_lists_every_format_and_the_batch_default(capsys):
    with pytest.raises(SystemExit):
        main(["describe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"a format ({', '.join(FORMATS)}) or a spec string" in text
    assert "batch size of the path and FLOPs (default: 1)" in text


@pytest.mark.parametrize(
    ("batch", "line"),
    [
        (
            1,
            "for batch 1: x @ core[:I] + core[I] in step (2) without gradients to the cores; "
            "with them a column of ones (the split from 7 rows)",
        ),
        (
            7,
            "for batch 7: x @ core[:I] + core[I] in step (2), with or without gradients to "
            "the cores",
        ),
    ],
)
def test_describes_bias_line_says_which_rule_applies_to_the_batch(capsys, batch, line):
    argv = ["describe", "cp", "--expert-dims", "8", "--in-features", "4", "--out-features", "2"]
    assert main([*argv, "--rank", "3", "--batch", str(batch)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"  bias        {line}"


@pytest.mark.slow
def test_python_dash_m_and_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "mumoe", "backends"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "numpy" in result.stdout
    result = subprocess.run([sys.executable, "-m", "mumoe"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: mumoe" in result.stderr


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `mumoe describe ... | head` ended in a BrokenPipeError traceback (issue #16, item 7).
    argv = [
        sys.executable,
        "-m",
        "mumoe",
        "describe",
        "cp",
        "--expert-dims",
        "128",
        "--in-features",
        "768",
        "--out-features",
        "1000",
        "--rank",
        "64",
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader leaves before anything is written
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait() == 0 and "Traceback" not in stderr, stderr


def test_describe_with_support_says_which_levels_go_sparse(capsys):
    args = ["describe", "mxd", "--expert-dims", "24576", "--in-features", "3072"]
    args += ["--out-features", "768", "--batch", "256", "--support", "32", "--backend", "pytorch"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "n1: k = 32 of 24,576 (k/N = 0.0013 <= crossover 0.1, pytorch" in out
    assert "89% fewer than the dense path's" in out
    assert main([*args[:-4], "--support", "30000"]) == 2
    assert "a support of n1 holds at most its 24576 experts, got 30000" in capsys.readouterr().err
