"""Shared fixtures: the backend matrix read from backends/, and hypothesis profiles."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tensorly as tl
from hypothesis import HealthCheck, settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

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


def load_backends() -> list[dict[str, Any]]:
    """The declarations in backends/*.toml, numpy first."""
    specs = [tomllib.loads(p.read_text()) for p in sorted((ROOT / "backends").glob("*.toml"))]
    return sorted(specs, key=lambda s: (s["name"] != "numpy", s["name"]))


def unavailable_reason(spec: dict[str, Any]) -> str | None:
    """Why a backend cannot run here, or None if it can."""
    if importlib.util.find_spec(spec["module"]) is None:
        extra = f" (pip install 'mumoe[{spec['extra']}]')" if spec["extra"] else ""
        return f"{spec['module']} is not installed{extra}"
    if spec["device"] == "cuda":
        try:
            module = importlib.import_module(spec["module"])
            count = module.cuda.runtime.getDeviceCount()
        except Exception as error:  # no driver, no runtime: the same for the user
            return f"{spec['module']} cannot reach a CUDA device: {error}"
        if count < 1:
            return f"{spec['module']} sees no CUDA device"
    return None


BACKENDS = load_backends()
AVAILABLE = [s["name"] for s in BACKENDS if unavailable_reason(s) is None]


def backend_params(differentiable: bool = False) -> list[Any]:
    """``pytest.param`` per declared backend, skipped with a reason where unusable."""
    params = []
    for spec in BACKENDS:
        if differentiable and not spec["differentiable"]:
            continue
        reason = unavailable_reason(spec)
        marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
        if spec["device"] == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(spec["name"], marks=marks, id=spec["name"]))
    return params


def backend_dtype_params() -> list[Any]:
    """``pytest.param`` per (backend, dtype) declared in backends/."""
    params = []
    for spec, param in zip(BACKENDS, backend_params(), strict=True):
        for dtype in spec["dtypes"]:
            params.append(
                pytest.param((spec["name"], dtype), marks=param.marks, id=f"{spec['name']}-{dtype}")
            )
    return params


def pytest_report_header(config: pytest.Config) -> list[str]:
    declared = ", ".join(s["name"] for s in BACKENDS)
    return [
        f"mumoe backends: declared {declared}; usable here: {', '.join(AVAILABLE)}",
        f"TensorLy default backend: {tl.get_backend()}",
    ]


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
def _restore_backend() -> Any:
    # A failing test must not leave another backend active for the next one.
    previous = tl.get_backend()
    yield
    left = tl.get_backend()
    if left != previous:
        tl.set_backend(previous)
        pytest.fail(f"test left the TensorLy backend set to {left!r}")
