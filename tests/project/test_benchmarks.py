"""The benchmark suite runs (a smoke test: ``--quick`` shapes; timing is not tested)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytest.importorskip("torch", reason="the benchmarks time torch implementations")
pytest.importorskip("einops", reason="the reference order is written with einops (mumoe[bench])")


@pytest.mark.slow
def test_quick_run_writes_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())["records"]
    configs = {r["config"] for r in records}
    assert {
        "quick-cp",
        "quick-tr-h2",
        "quick-tucker",
        "quick-tt",
        "quick-mxd",
        "tiny-cp",
        "tiny-tr",
    } <= configs
    for record in records:
        assert record["forward_ms"] > 0 and record["forward_backward_ms"] > 0
    impls = {r["impl"] for r in records if r["table"] == "contraction"}
    assert {"mumoe", "reference order", "limit", "opt_einsum optimal"} <= impls
    assert "## quick-cp" in result.stdout


@pytest.mark.slow
def test_the_activation_benchmark_runs(tmp_path):
    out = tmp_path / "activations.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.activations",
            "--quick",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert [row["shape"] for row in written["torch"]] == [[1, 8], [4, 100]]
    assert {"softmax f", "entmax15 f+b", "sparsemax f", "entmax15 package k=32 f+b"} <= set(
        written["torch"][0]["seconds"]
    )
    assert [row["batch"] for row in written["layers"]] == [8, 256]
    assert "| 4 × 100 |" in result.stdout


@pytest.mark.slow
def test_the_expert_health_benchmark_runs():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.health", "--rounds", "1", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| monitored |" in result.stdout and "| balance loss |" in result.stdout


@pytest.mark.slow
def test_the_analysis_benchmark_runs():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.analysis", "--rounds", "1", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| gate_statistics, 10 classes |" in result.stdout
    assert "| collect_gates |" in result.stdout
