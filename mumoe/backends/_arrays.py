"""Arrays on a backend: switching TensorLy's backend for one thread, and new arrays like old.

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
from collections.abc import Iterator
from typing import Any

import tensorly as tl
from tensorly.backend import BackendManager

__all__ = [
    "array_device",
    "cast",
    "creation_context",
    "preserved_backend",
    "thread_backend",
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
            # What tl.set_backend(name, local_threadsafe=True) does once the backend is
            # loaded, without its call: the torch modules switch on every forward pass.
            loaded = BackendManager._loaded_backends.get(self._name)
            if loaded is None:
                tl.set_backend(self._name, local_threadsafe=True)
            else:
                local["backend"] = loaded

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

    Keys autotuned plans (:meth:`mumoe.plan.Planner.forward`): a path timed
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
