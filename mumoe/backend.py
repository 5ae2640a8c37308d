"""Switching TensorLy's backend for the current thread only.

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

import tensorly as tl
from tensorly.backend import BackendManager

__all__ = ["preserved_backend", "thread_backend"]


@contextlib.contextmanager
def thread_backend(name: str) -> Iterator[None]:
    """Make ``name`` the TensorLy backend of the calling thread, then restore it.

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
    if tl.get_backend() == name:
        yield
        return
    # TensorLy keeps the per-thread choice in this threading.local; the global
    # default stays untouched with local_threadsafe=True.
    local = BackendManager._THREAD_LOCAL_DATA.__dict__
    missing = object()
    previous = local.get("backend", missing)
    tl.set_backend(name, local_threadsafe=True)
    try:
        yield
    finally:
        if previous is missing:
            local.pop("backend", None)
        else:
            local["backend"] = previous


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
