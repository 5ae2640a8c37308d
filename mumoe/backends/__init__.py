"""Array backends: their declarations (one TOML file each, here), and arrays on them.

What differs per backend is declared once, in ``mumoe/backends/<name>.toml``
(see this folder's README): the module that must import, the install extra,
the device, the dtypes tested, and the backend's own kernels, which the core
calls by name.  Everything else in mumoe is backend-neutral TensorLy code.
"""

from mumoe.backends._arrays import (
    array_device,
    cast,
    creation_context,
    preserved_backend,
    thread_backend,
)
from mumoe.backends._declarations import (
    BackendDeclaration,
    backend_erf,
    backend_function,
    declared_backend,
    declared_backends,
    sparse_crossover,
    sparse_min_work,
    unavailable_reason,
)
from mumoe.backends._fork import forked_child

__all__ = [
    "BackendDeclaration",
    "array_device",
    "backend_erf",
    "backend_function",
    "cast",
    "creation_context",
    "declared_backend",
    "declared_backends",
    "forked_child",
    "preserved_backend",
    "sparse_crossover",
    "sparse_min_work",
    "thread_backend",
    "unavailable_reason",
]
