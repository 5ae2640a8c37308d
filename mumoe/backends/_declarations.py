"""Array backends as declared: one TOML file each in this folder, read once.

:func:`declared_backends` reads ``mumoe/backends/*.toml`` (shipped with the
package), :func:`unavailable_reason` says why a backend cannot run on this
machine, and :func:`backend_function` resolves a function a backend declares
(``module:function``, imported on first use and remembered).  The test suite
and ``mumoe backends`` read the same declarations, so adding a backend means
adding a file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorly as tl

__all__ = [
    "BackendDeclaration",
    "backend_erf",
    "backend_function",
    "declared_backend",
    "declared_backends",
    "sparse_crossover",
    "sparse_min_work",
    "unavailable_reason",
]


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
        top-k gating (:func:`mumoe.gates.topk`) needs of the backend.
    bias_matmul : str, default ""
        ``"module:function"`` computing ``x @ core[:I] + core[I]`` with its
        own gradient (:func:`mumoe.nn.bias_matmul`), or empty;
        preferred to ``addmm``.
    entmax15, sparsemax : str, default ""
        ``"module:function"`` of the backend's own kernel of that gate
        activation (NumPy's, :mod:`mumoe.gates.entmax_cpu`; the torch family's,
        :mod:`mumoe.nn`), or empty: :mod:`mumoe.gates.entmax` runs on the
        backend's arrays.
    top_k : str, default ""
        ``"module:function"`` returning each row's ``k`` largest entries and
        their indices, largest first, ``(..., N) -> ((..., k), (..., k))``:
        what a top-k gate's support (:class:`mumoe.typing.SparseGate`) needs.
    scatter_rows : str, default ""
        ``"module:function"`` of ``scatter_rows(values, indices, n)``, the
        dense ``(B, n)`` rows of a support ``(B, k)`` (differentiable in
        ``values`` where the backend is).
    gather_sum : str, default ""
        ``"module:function"`` of ``gather_sum(table, indices, values)``,
        ``sum_j values[b, j] * table[indices[b, j]]`` for a table ``(N, D)``
        and a support ``(B, k)``, with a backward that touches only the
        gathered rows (``torch.nn.functional.embedding_bag``), or empty: a
        take and a batched product.
    sparse_crossover : float, default 0.0
        The largest support density ``k / N`` at which a level is contracted
        sparsely (gathering ``k`` rows) rather than densely when no gradient
        flows to the cores (evaluation, serving), as measured on the backend
        (``python -m benchmarks.sparse``); 0: never by default.
    sparse_crossover_training : float, default 0.0
        The same where gradients flow to the cores (a gathered core's
        backward scatters into its rows, dearer than a product's).
    sparse_min_work : int, default 0
        The fewest multiply-adds, :math:`B N_e D_e`, of a level's dense step
        (a batch times the expert core's entries) for which a gather is
        worth its fixed per-call cost; smaller steps stay dense.
    sparse_min_work_training : int, default 0
        The same where gradients flow to the cores.
    sparsify_min_width : int, default 0
        The fewest entries per expert (:math:`D_e`) of a level's expert cores
        for which a gate whose support must be counted and selected from its
        dense output (entmax-1.5, sparsemax, custom activations; top-k
        selects its support directly) is handed over as a support: that
        selection costs about as much per row as a product of width
        :math:`D_e`.
    jit : str, default ""
        ``"module:function"`` compiling a function of arrays once per shape
        (``jax.jit``), or empty: compiled plans are wrapped in it.
    max_examples : int, default 0
        Hypothesis examples per property test on this backend (0: the
        profile's); for backends that compile every new shape.
    note : str, default ""
        What a user of the backend should know, printed by ``mumoe backends``.

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
    top_k: str = ""
    scatter_rows: str = ""
    gather_sum: str = ""
    sparse_crossover: float = 0.0
    sparse_crossover_training: float = 0.0
    sparse_min_work: int = 0
    sparse_min_work_training: int = 0
    sparsify_min_width: int = 0
    jit: str = ""
    max_examples: int = 0
    note: str = ""


def _declarations_dir() -> Path:
    return Path(__file__).parent


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
                    top_k=str(data.get("top_k", "")),
                    scatter_rows=str(data.get("scatter_rows", "")),
                    gather_sum=str(data.get("gather_sum", "")),
                    sparse_crossover=float(data.get("sparse_crossover", 0.0)),
                    sparse_crossover_training=float(data.get("sparse_crossover_training", 0.0)),
                    sparse_min_work=int(data.get("sparse_min_work", 0)),
                    sparse_min_work_training=int(data.get("sparse_min_work_training", 0)),
                    sparsify_min_width=int(data.get("sparsify_min_width", 0)),
                    jit=str(data.get("jit", "")),
                    max_examples=int(data.get("max_examples", 0)),
                    note=str(data.get("note", "")),
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
        raise ValueError(f"backend {name!r} is not declared in mumoe/backends/; add a file for it")
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


def declared_backend(backend: str) -> BackendDeclaration | None:
    """The declaration of ``backend`` (``mumoe/backends/<name>.toml``), or None, read once.

    Parameters
    ----------
    backend : str

    Returns
    -------
    BackendDeclaration or None

    Examples
    --------
    >>> declared_backend("numpy").module, declared_backend("no such backend")
    ('numpy', None)
    """
    if backend not in _DECLARED:
        _DECLARED[backend] = next((b for b in declared_backends() if b.name == backend), None)
    return _DECLARED[backend]


_DECLARED: dict[str, BackendDeclaration | None] = {}


def sparse_min_work(backend: str, training: bool = False) -> int:
    """The smallest dense step (multiply-adds) ``backend`` replaces by a gather.

    As declared (``sparse_min_work`` and ``sparse_min_work_training`` in
    ``mumoe/backends/<name>.toml``); 0 where none is.

    Parameters
    ----------
    backend : str
    training : bool, default False
        Whether gradients flow to the cores.

    Returns
    -------
    int

    Examples
    --------
    >>> sparse_min_work("no such backend")
    0
    """
    declaration = declared_backend(backend)
    if declaration is None:
        return 0
    return declaration.sparse_min_work_training if training else declaration.sparse_min_work


def sparse_crossover(backend: str, training: bool = False) -> float:
    """The support density ``k / N`` up to which ``backend`` contracts a level sparsely.

    As declared (``sparse_crossover`` and ``sparse_crossover_training`` in
    ``mumoe/backends/<name>.toml``, measured by ``python -m
    benchmarks.sparse --groups crossover``); 0.0 for a backend that declares
    none, or is not declared: never sparse unless a planner is told otherwise
    (:class:`mumoe.plan.Planner`, ``crossover``).

    Parameters
    ----------
    backend : str
        A TensorLy backend name.
    training : bool, default False
        Whether gradients flow to the cores.

    Returns
    -------
    float
        In ``[0, 1]``.

    Examples
    --------
    >>> 0 < sparse_crossover("numpy") < 1, sparse_crossover("no such backend")
    (True, 0.0)
    """
    declaration = declared_backend(backend)
    if declaration is None:
        return 0.0
    return declaration.sparse_crossover_training if training else declaration.sparse_crossover


# Resolved declared functions, by (backend, kind).
_FUNCTIONS: dict[tuple[str, str], Any] = {}
