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

#: Doctests (files of mumoe/ and docs/) that need an optional library: where it is missing,
#: they are skipped with the reason; modules that cannot even be imported without it are
#: skipped by pytest's --doctest-ignore-import-errors, switched on for that case.
NEEDS = {
    "torch": (
        "mumoe/nn/",
        "mumoe/demo/",
        "mumoe/backends/_arrays.py",
        "docs/torch.rst",
        "docs/theory/cp.rst",
        "docs/theory/mxd.rst",
        "docs/theory/sparse.rst",
        "docs/theory/tr.rst",
        "docs/theory/tt.rst",
        "docs/theory/ttm.rst",
        "docs/theory/tucker.rst",
    ),
    "matplotlib": ("mumoe/plotting.py", "mumoe/demo/"),
    "sklearn": ("mumoe/demo/",),
    "tqdm": ("mumoe/demo/",),
    "transformers": (
        "mumoe/nn/_frontier.py::mumoe.nn._frontier.frontier",
        "mumoe/demo/_lm.py",
    ),
}
MISSING = [name for name in NEEDS if importlib.util.find_spec(name) is None]


def pytest_configure(config: pytest.Config) -> None:
    """Skip, rather than fail, the doctests of modules an optional library is missing for."""
    if MISSING:
        config.option.doctest_ignore_import_errors = True


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
SLOW_DOCTESTS = {
    "mumoe/demo/_experiment.py::mumoe.demo._experiment.run",
    "mumoe/demo/_lm.py::mumoe.demo._lm.run_lm",
    "docs/theory/sparse.rst::sparse.rst",  # trains a layer of 2^20 experts two steps
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow doctests ``slow``; skip the doctests whose library is missing, saying so."""
    for item in items:
        if item.nodeid in SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)
        for name in MISSING:
            if item.nodeid.startswith(NEEDS[name]):
                reason = f"its examples need {name}, which is not installed"
                item.add_marker(pytest.mark.skip(reason=reason))


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
