"""Array backends: their declarations, and switching TensorLy's for one thread.

The backends mumoe supports are declared once, one TOML file each, in the
repository's ``backends/`` folder (shipped inside the wheel as
``mumoe/_backends``): :func:`declared_backends` reads them, and
:func:`unavailable_reason` says why one cannot run here.  The test suite and
``mumoe backends`` both use them, so adding a backend means adding a file.

mumoe never calls ``tl.set_backend`` on the user's behalf: the functional core
runs on whatever backend is active.  The PyTorch modules are the one place
where the backend is implied by the arrays (a ``torch.nn.Module`` computes
with torch), so they run the functional core inside :func:`thread_backend`,
which sets the backend for the calling thread and restores that thread's
previous setting on exit.  TensorLy's own ``backend_context`` is not used:
it restores by calling ``set_backend`` globally, which would overwrite the
default of every other thread.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorly as tl
from tensorly.backend import BackendManager

from mumoe.contraction import Kernels

__all__ = [
    "BackendDeclaration",
    "array_device",
    "backend_erf",
    "backend_function",
    "backend_kernels",
    "cast",
    "creation_context",
    "declared_backends",
    "preserved_backend",
    "thread_backend",
    "unavailable_reason",
]


class thread_backend:
    """Make ``name`` the TensorLy backend of the calling thread, then restore it.

    A class rather than a generator: the torch modules enter it on every
    call, and this costs a fraction of a microsecond when the backend is
    already ``name``.

    Parameters
    ----------
    name : str
        A TensorLy backend name, e.g. ``"pytorch"``.

    Examples
    --------
    >>> import tensorly as tl
    >>> with thread_backend("pytorch"):
    ...     tl.get_backend()
    'pytorch'
    >>> tl.get_backend()
    'numpy'
    """

    __slots__ = ("_name", "_previous")

    def __init__(self, name: str) -> None:
        self._name = name
        self._previous: Any = _MISSING

    def __enter__(self) -> None:
        # TensorLy keeps the per-thread choice in this threading.local; the
        # global default stays untouched with local_threadsafe=True.
        local = BackendManager._THREAD_LOCAL_DATA.__dict__
        previous = local.get("backend", _MISSING)
        self._previous = previous
        active = BackendManager._backend if previous is _MISSING else previous
        if active.backend_name != self._name:
            tl.set_backend(self._name, local_threadsafe=True)

    def __exit__(self, *exc: object) -> None:
        local = BackendManager._THREAD_LOCAL_DATA.__dict__
        if self._previous is _MISSING:
            local.pop("backend", None)
        else:
            local["backend"] = self._previous


_MISSING = object()


@contextlib.contextmanager
def preserved_backend() -> Iterator[None]:
    """Undo any change to TensorLy's backend, global or per-thread, made inside.

    For importing libraries that call ``tl.set_backend`` at import time
    (tensorly-torch sets ``"pytorch"`` for the whole process).

    Examples
    --------
    >>> import tensorly as tl
    >>> with preserved_backend():
    ...     tl.set_backend("pytorch")
    >>> tl.get_backend()
    'numpy'
    """
    local = BackendManager._THREAD_LOCAL_DATA.__dict__
    missing = object()
    saved = (
        BackendManager._backend,
        BackendManager._default_backend,
        local.get("backend", missing),
    )
    try:
        yield
    finally:
        BackendManager._backend, BackendManager._default_backend, previous = saved
        if previous is missing:
            local.pop("backend", None)
        else:
            local["backend"] = previous


@dataclass(frozen=True)
class BackendDeclaration:
    """One array backend, as declared in ``backends/<name>.toml``.

    Parameters
    ----------
    name : str
        The TensorLy backend name (``tl.set_backend(name)``).
    module : str
        The module that must import for the backend to be usable.
    extra : str
        The mumoe extra that installs it (empty for a core dependency).
    device : str
        ``"cpu"``, or ``"cuda"`` when it needs a CUDA device.
    differentiable : bool
        Whether gradients flow through mumoe's functions on it.
    dtypes : tuple of str
        The floating dtypes the tests run on it.
    erf : str
        ``"module:function"`` of its error function, which TensorLy lacks.
    addmm : str, default ""
        ``"module:function"`` computing ``c + a @ b`` in one call
        (``torch.addmm``'s signature), or empty: the compiled plans add a
        bias inside the contraction with it.
    kth_largest : str, default ""
        ``"module:function"`` returning the ``k``-th largest entry of each row,
        ``(..., N) -> (..., 1)``, by a selection rather than a sort: what
        top-k gating (:func:`mumoe.activations.topk`) needs of the backend.
    bias_matmul : str, default ""
        ``"module:function"`` computing ``x @ core[:I] + core[I]`` with its
        own gradient (:func:`mumoe.nn.kernels.bias_matmul`), or empty;
        preferred to ``addmm``.
    entmax15, sparsemax : str, default ""
        ``"module:function"`` of the backend's own kernel of that gate
        activation (NumPy's, :mod:`mumoe.simplex_cpu`; the torch family's,
        :mod:`mumoe.nn.simplex`), or empty: :mod:`mumoe.simplex` runs on the
        backend's arrays.
    jit : str, default ""
        ``"module:function"`` compiling a function of arrays once per shape
        (``jax.jit``), or empty: compiled plans are wrapped in it.
    max_examples : int, default 0
        Hypothesis examples per property test on this backend (0: the
        profile's); for backends that compile every new shape.

    Examples
    --------
    >>> numpy = next(b for b in declared_backends() if b.name == "numpy")
    >>> numpy.module, numpy.device, numpy.differentiable, numpy.dtypes
    ('numpy', 'cpu', False, ('float64', 'float32'))
    """

    name: str
    module: str
    extra: str
    device: str
    differentiable: bool
    dtypes: tuple[str, ...]
    erf: str
    addmm: str = ""
    kth_largest: str = ""
    bias_matmul: str = ""
    entmax15: str = ""
    sparsemax: str = ""
    jit: str = ""
    max_examples: int = 0


def _declarations_dir() -> Path:
    packaged = Path(__file__).parent / "_backends"  # in an installed wheel
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "backends"


def declared_backends() -> list[BackendDeclaration]:
    """The backends declared in ``backends/*.toml``, NumPy first.

    Returns
    -------
    list of BackendDeclaration

    Raises
    ------
    ValueError
        If a declaration file is malformed or misses a key.

    Examples
    --------
    >>> [b.name for b in declared_backends()][:2]
    ['numpy', 'cupy']
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    declarations = []
    for path in sorted(_declarations_dir().glob("*.toml")):
        data = tomllib.loads(path.read_text())
        try:
            declarations.append(
                BackendDeclaration(
                    name=str(data["name"]),
                    module=str(data["module"]),
                    extra=str(data["extra"]),
                    device=str(data["device"]),
                    differentiable=bool(data["differentiable"]),
                    dtypes=tuple(data["dtypes"]),
                    erf=str(data["erf"]),
                    addmm=str(data.get("addmm", "")),
                    kth_largest=str(data.get("kth_largest", "")),
                    bias_matmul=str(data.get("bias_matmul", "")),
                    entmax15=str(data.get("entmax15", "")),
                    sparsemax=str(data.get("sparsemax", "")),
                    jit=str(data.get("jit", "")),
                    max_examples=int(data.get("max_examples", 0)),
                )
            )
        except KeyError as error:
            raise ValueError(f"backend declaration {path} lacks the key {error}") from None
    return sorted(declarations, key=lambda b: (b.name != "numpy", b.name))


def unavailable_reason(backend: BackendDeclaration) -> str | None:
    """Why ``backend`` cannot run on this machine, or None if it can.

    Parameters
    ----------
    backend : BackendDeclaration

    Returns
    -------
    str or None
        The reason, naming the extra to install where one is missing.

    Examples
    --------
    >>> unavailable_reason(next(b for b in declared_backends() if b.name == "numpy")) is None
    True
    """
    if importlib.util.find_spec(backend.module) is None:
        extra = f" (pip install 'mumoe[{backend.extra}]')" if backend.extra else ""
        return f"{backend.module} is not installed{extra}"
    if backend.device == "cuda":
        try:
            module = importlib.import_module(backend.module)
            count = module.cuda.runtime.getDeviceCount()
        except Exception as error:  # no driver, no runtime: the same for the user
            return f"{backend.module} cannot reach a CUDA device: {error}"
        if count < 1:
            return f"{backend.module} sees no CUDA device"
    return None


def backend_erf(backend: str | None = None) -> Any:
    r"""The error function of ``backend`` (default: the active one), as declared.

    Parameters
    ----------
    backend : str, optional
        A declared backend's name; the active TensorLy backend by default.

    Returns
    -------
    callable
        Elementwise :math:`\mathrm{erf}` on that backend's tensors.

    Raises
    ------
    ValueError
        If the backend is not declared in ``backends/``.

    Examples
    --------
    >>> import numpy as np
    >>> float(backend_erf("numpy")(np.array(0.5)))  # doctest: +ELLIPSIS
    0.5204998778...
    """
    name = tl.get_backend() if backend is None else backend
    function = backend_function(name, "erf")
    if function is None:
        raise ValueError(f"backend {name!r} is not declared in backends/; add a file for it")
    return function


def backend_function(backend: str, kind: str) -> Any:
    """The function a backend declares for ``kind`` (``"erf"``, ``"bias_matmul"``), or None.

    Parameters
    ----------
    backend : str
        A TensorLy backend name.
    kind : str
        A ``module:function`` key of the declarations.

    Returns
    -------
    callable or None
        None where the backend is not declared or declares nothing for ``kind``.

    Examples
    --------
    >>> backend_function("numpy", "addmm") is None
    True
    """
    key = (backend, kind)
    if key not in _FUNCTIONS:
        declaration = next((b for b in declared_backends() if b.name == backend), None)
        target = "" if declaration is None else getattr(declaration, kind)
        function = None
        if target:
            module, _, attribute = target.partition(":")
            function = getattr(importlib.import_module(module), attribute)
        _FUNCTIONS[key] = function
    return _FUNCTIONS[key]


def backend_kernels(backend: str) -> Kernels:
    """The kernels ``backend`` declares for compiled programs (none if undeclared).

    Parameters
    ----------
    backend : str
        A TensorLy backend name.

    Returns
    -------
    mumoe.contraction.Kernels

    Examples
    --------
    >>> backend_kernels("numpy")
    Kernels(addmm=None, jit=None, bias_matmul=None)
    """
    return Kernels(
        addmm=backend_function(backend, "addmm"),
        jit=backend_function(backend, "jit"),
        bias_matmul=backend_function(backend, "bias_matmul"),
    )


# Resolved declared functions, by (backend, kind).
_FUNCTIONS: dict[tuple[str, str], Any] = {}


def creation_context(tensor: Any) -> dict[str, Any]:
    """``tl.context(tensor)`` without ``requires_grad``: the dtype and device for new arrays.

    Arrays mumoe creates (a column of ones, masks) take their context from an
    input, but must not become leaves that ask for gradients.

    Parameters
    ----------
    tensor : tensor of the active backend

    Returns
    -------
    dict
        Keyword arguments for ``tl.tensor``.

    Examples
    --------
    >>> import torch
    >>> with thread_backend("pytorch"):  # tl.context asks the active backend
    ...     creation_context(torch.zeros(2, requires_grad=True))
    {'dtype': torch.float32, 'device': device(type='cpu')}
    """
    context = dict(tl.context(tensor))
    context.pop("requires_grad", None)
    return context


def array_device(tensor: Any) -> str:
    """The device an array lives on, as a string: ``"cpu"``, ``"cuda:0"``, ...

    Keys autotuned plans (:meth:`mumoe.planner.Planner.forward`): a path timed
    on one device is not reused on another.

    Parameters
    ----------
    tensor : array of any backend

    Returns
    -------
    str
        ``str(tensor.device)`` (torch, CuPy, JAX, NumPy 2), ``"cpu"`` for
        arrays without a device.

    Examples
    --------
    >>> import numpy as np, torch
    >>> array_device(np.zeros(2)), array_device(torch.zeros(2))
    ('cpu', 'cpu')
    """
    device = getattr(tensor, "device", None)
    return "cpu" if device is None or callable(device) else str(device)


def cast(tensor: Any, dtype: Any) -> Any:
    """``tensor`` in ``dtype``, on its own backend and device, differentiably.

    ``astype`` for NumPy, CuPy and JAX arrays, ``to`` for torch tensors
    (TensorLy's ``tl.tensor`` would copy and detach).

    Parameters
    ----------
    tensor : tensor of any backend
    dtype : dtype of that backend

    Returns
    -------
    tensor

    Examples
    --------
    >>> import numpy as np
    >>> cast(np.ones(2), np.float32).dtype
    dtype('float32')
    """
    return tensor.astype(dtype) if hasattr(tensor, "astype") else tensor.to(dtype)
