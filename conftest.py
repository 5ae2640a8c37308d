"""pytest configuration for the whole suite: tests/, the doctests of mumoe/ and docs/.

Shared fixtures (the backend matrix read from backends/), hypothesis profiles,
and what to leave out where an optional framework is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile

# Each pytest-xdist worker gets one core's worth of threads: BLAS and torch
# pools of every worker together would oversubscribe the machine (set before
# NumPy or torch start their pools).
if "PYTEST_XDIST_WORKER" in os.environ:
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tensorly as tl
from hypothesis import HealthCheck, settings

from mumoe.backend import declared_backends, unavailable_reason

ROOT = Path(__file__).resolve().parent

# Without torch, the doctests of the torch modules cannot even be imported;
# their tests skip themselves with the reason.
collect_ignore_glob = []
if importlib.util.find_spec("torch") is None:
    collect_ignore_glob += [
        "mumoe/nn/*",
        "mumoe/compat.py",
        "mumoe/analysis.py",
        "mumoe/inference.py",
        "mumoe/backend.py",
        "docs/torch.rst",
        "docs/theory/mxd.rst",
        "benchmarks/*",
    ]  # mumoe/backend.py: its examples switch to pytorch

if importlib.util.find_spec("matplotlib") is None:
    collect_ignore_glob += ["mumoe/plotting.py"]
if any(importlib.util.find_spec(m) is None for m in ("torch", "sklearn", "matplotlib", "tqdm")):
    collect_ignore_glob += ["mumoe/demo.py"]  # its examples run the demo

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


BACKENDS = declared_backends()
AVAILABLE = [b.name for b in BACKENDS if unavailable_reason(b) is None]


def backend_params(differentiable: bool = False) -> list[Any]:
    """``pytest.param`` per declared backend, skipped with a reason where unusable."""
    params = []
    for spec in BACKENDS:
        if differentiable and not spec.differentiable:
            continue
        reason = unavailable_reason(spec)
        marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
        if spec.device == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(spec.name, marks=marks, id=spec.name))
    return params


def backend_dtype_params() -> list[Any]:
    """``pytest.param`` per (backend, dtype) declared in backends/."""
    params = []
    for spec, param in zip(BACKENDS, backend_params(), strict=True):
        for dtype in spec.dtypes:
            params.append(
                pytest.param((spec.name, dtype), marks=param.marks, id=f"{spec.name}-{dtype}")
            )
    return params


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which backends the run can use (compare with MUMOE_EXPECT_BACKENDS in CI)."""
    declared = ", ".join(s.name for s in BACKENDS)
    return [
        f"mumoe backends: declared {declared}; usable here: {', '.join(AVAILABLE)}",
        f"TensorLy default backend: {tl.get_backend()}",
    ]


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no leading underscore."""
    import pkgutil

    import mumoe

    found = ["mumoe"]
    for info in pkgutil.walk_packages(mumoe.__path__, "mumoe."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return sorted(found)


def randomise(
    module: Any, seed: int = 0, *, scale: float = 1.0, normal: bool = False, only: str = ""
) -> Any:
    """Random values in a torch module's parameters (whose names contain ``only``), in place.

    Uniform in [-scale, scale), or normal with standard deviation ``scale``:
    gate projections start at zero and levels past the first at ones, so a
    module straight from its constructor hides many mistakes.  Returns the
    module.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only not in name:
                continue
            if normal:
                values = torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale
            else:
                values = torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 * scale - scale
            p.copy_(values)
    return module


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the active TensorLy backend, then restore the previous one."""
    previous = tl.get_backend()
    tl.set_backend(name)
    try:
        yield
    finally:
        tl.set_backend(previous)


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
