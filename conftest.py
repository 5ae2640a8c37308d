"""pytest configuration for the whole suite: tests/, the doctests of mumoe/ and docs/.

Fixtures (the active backend, temporary files), hypothesis profiles, the
report header, and what to leave out where an optional library is missing.
Helpers the tests import live in ``tests/helpers.py``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

# Each pytest-xdist worker gets one core's worth of threads: BLAS and torch
# pools of every worker together would oversubscribe the machine (set before
# NumPy or torch start their pools).
if "PYTEST_XDIST_WORKER" in os.environ:
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")
from typing import Any

import pytest
import tensorly as tl
from hypothesis import HealthCheck, settings

from tests.helpers import AVAILABLE, BACKENDS, backend_params, use_backend


def _missing(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) is None for m in modules)


# Doctests that cannot even be imported or run without an optional library are left
# out of collection; tests that need one skip themselves with the reason.
collect_ignore_glob = []
if _missing("torch"):
    collect_ignore_glob += [
        "mumoe/nn/*",
        "mumoe/backends/_arrays.py",  # its examples switch to pytorch
        "docs/torch.rst",
        "docs/theory/*.rst",  # the theory pages compare initialisations in torch
        "benchmarks/*",
    ]
if _missing("matplotlib"):
    collect_ignore_glob += ["mumoe/plotting.py"]
if _missing("torch", "sklearn", "matplotlib", "tqdm"):
    collect_ignore_glob += ["mumoe/demo/*"]  # its examples run the demo

# CI: reproducible examples, no deadline on a shared machine. dev: fresh examples each run.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=60, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


#: Doctests among the dozen slowest tests (the demo trains heads): ``-m "not slow"`` leaves them.
SLOW_DOCTESTS = {"mumoe/demo/_experiment.py::mumoe.demo._experiment.run"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow doctests ``slow`` (tests mark themselves)."""
    for item in items:
        if item.nodeid in SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which backends the run can use (compare with MUMOE_EXPECT_BACKENDS in CI)."""
    declared = ", ".join(s.name for s in BACKENDS)
    return [
        f"mumoe backends: declared {declared}; usable here: {', '.join(AVAILABLE)}",
        f"TensorLy default backend: {tl.get_backend()}",
    ]


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> Any:
    """Each usable backend in turn, active for the test."""
    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _temporary_files_under_pytest(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Doctests and library code call tempfile.mkdtemp(): put what they make under pytest's
    # own temporary folder (kept for the last three runs, then removed), not /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(autouse=True)
def _restore_backend() -> Any:
    # A failing test must not leave another backend active for the next one.
    previous = tl.get_backend()
    yield
    left = tl.get_backend()
    if left != previous:
        tl.set_backend(previous)
        pytest.fail(f"test left the TensorLy backend set to {left!r}")
