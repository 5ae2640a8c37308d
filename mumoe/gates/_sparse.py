r"""Gates by their support: top-k supports without a dense detour, and dense ↔ sparse.

A :class:`~mumoe.typing.SparseGate` holds each row's support (indices and
values) instead of a mostly-zero ``(B, N)`` matrix.  Top-k and ReLU-top-k
gates produce theirs directly from a selection of each row's ``k + 1``
largest logits (:func:`topk_support`, :func:`relu_topk_support`); any other
activation's coefficients are turned into one by :func:`sparsify` where
their support is small.  Either way the result stands for exactly the dense
coefficients the activation gives, ties at the top-k boundary included, and
:func:`mumoe.functional.densify` gives those back.  A support wider than ``max_density``
times ``N`` stays dense: the contraction would not gain from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorly as tl

from mumoe.backends import backend_function, creation_context
from mumoe.gates._activations import check_top_k, relu_topk, topk
from mumoe.typing import SparseGate, Tensor

__all__ = [
    "SPARSE_ACTIVATIONS",
    "relu_topk_support",
    "scatter_rows_by_assignment",
    "scatter_rows_by_at",
    "sparsify",
    "top_k_by_lax",
    "top_k_by_partition",
    "topk_support",
]

Gate = Tensor | SparseGate


def top_k_by_partition(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's ``k`` largest entries and their indices, largest first, by a partition.

    ``argpartition`` selects in linear time; only the ``k`` selected are
    sorted.  The ``top_k`` kernel ``mumoe/backends/numpy.toml`` and
    ``cupy.toml`` declare.

    Parameters
    ----------
    z : array, shape (..., N)
    k : int
        From 1 to N.

    Returns
    -------
    values, indices : arrays, shape (..., k)

    Examples
    --------
    >>> import numpy as np
    >>> top_k_by_partition(np.array([[3.0, 9.0, 1.0, 7.0]]), 2)
    (array([[9., 7.]]), array([[1, 3]]))
    """
    n = z.shape[-1]
    picked = np.argpartition(-z, k - 1, axis=-1)[..., :k] if k < n else np.argsort(-z, axis=-1)
    values = np.take_along_axis(z, picked, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return np.take_along_axis(values, order, axis=-1), np.take_along_axis(picked, order, axis=-1)


def top_k_by_lax(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's ``k`` largest entries and their indices, by ``jax.lax.top_k``.

    The ``top_k`` kernel ``mumoe/backends/jax.toml`` declares.

    Parameters
    ----------
    z : jax array, shape (..., N)
    k : int

    Returns
    -------
    values, indices : jax arrays, shape (..., k)

    Examples
    --------
    >>> import jax.numpy as jnp  # doctest: +SKIP
    >>> top_k_by_lax(jnp.array([[3.0, 9.0, 1.0, 7.0]]), 2)[1]  # doctest: +SKIP
    Array([[1, 3]], dtype=int32)
    """
    import jax

    return jax.lax.top_k(z, k)


def scatter_rows_by_assignment(values: Tensor, indices: Tensor, n: int) -> Tensor:
    """Dense rows ``(B, n)`` holding ``values`` at ``indices``, repeated indices added up.

    The ``scatter_rows`` kernel of NumPy and CuPy (``numpy.add.at``,
    ``cupyx.scatter_add``: unbuffered adds, so a repeated index sums its values, as a
    gather does).

    Parameters
    ----------
    values, indices : arrays, shape (B, k)
    n : int

    Returns
    -------
    array, shape (B, n)

    Examples
    --------
    >>> import numpy as np
    >>> scatter_rows_by_assignment(np.array([[0.5, 0.5]]), np.array([[2, 0]]), 3)
    array([[0.5, 0. , 0.5]])
    """
    rows = values.shape[0]
    out = tl.zeros((rows, n), **creation_context(values))
    where = (tl.reshape(tl.arange(rows), (rows, 1)), indices)
    if isinstance(out, np.ndarray):
        np.add.at(out, where, values)
    else:  # CuPy
        import cupyx

        cupyx.scatter_add(out, where, values)
    return out


def scatter_rows_by_at(values: Tensor, indices: Tensor, n: int) -> Tensor:
    """Dense rows ``(B, n)`` holding ``values`` at ``indices``, by ``.at[].add`` (JAX).

    Repeated indices add up, as a gather does.

    Parameters
    ----------
    values, indices : jax arrays, shape (B, k)
    n : int

    Returns
    -------
    jax array, shape (B, n)

    Examples
    --------
    >>> import jax.numpy as jnp  # doctest: +SKIP
    >>> scatter_rows_by_at(jnp.array([[0.5, 0.5]]), jnp.array([[2, 0]]), 3)  # doctest: +SKIP
    Array([[0.5, 0. , 0.5]], dtype=float32)
    """
    rows = values.shape[0]
    out = tl.zeros((rows, n), **creation_context(values))
    return out.at[tl.reshape(tl.arange(rows), (rows, 1)), indices].add(values)


def _kernel(kind: str) -> Any:
    backend = tl.get_backend()
    function = backend_function(backend, kind)
    if function is None:
        raise ValueError(
            f"sparse gates on backend {backend!r} need a {kind} kernel in mumoe/backends/"
        )
    return function


def _nan_guard(rows: Tensor) -> Tensor:
    # 0 in every row, NaN in a row holding NaN or +inf: added to the kept values, it gives
    # such a row NaN throughout, as the dense activations do (a selection may skip a NaN).
    top = tl.reshape(tl.max(rows, axis=-1), (*tl.shape(rows)[:-1], 1))
    return top - top


def sparsify(coefficients: Tensor, max_density: float = 1.0) -> Gate:
    """Dense coefficients as a :class:`~mumoe.typing.SparseGate` where their support is small.

    ``k`` is the largest number of non-zero entries in a row; each row keeps
    its ``k`` largest coefficients (its whole support, and entries of 0 where
    its support is smaller), so the result stands for exactly the same
    coefficients.  Where ``k / N`` exceeds ``max_density`` (or the batch is
    empty) the coefficients are returned dense.

    Parameters
    ----------
    coefficients : tensor, shape (..., N)
        Non-negative, as every gate activation gives.
    max_density : float, default 1.0
        The widest support, as a share of ``N``, worth a sparse contraction.

    Returns
    -------
    SparseGate or tensor
        The values are differentiable in ``coefficients`` where the backend is.

    Examples
    --------
    >>> import numpy as np
    >>> sparse = sparsify(np.array([[0.0, 0.7, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0]]))
    >>> sparse.indices, sparse.values
    (array([[1, 3],
           [2, 0]]), array([[0.7, 0.3],
           [1. , 0. ]]))
    >>> sparsify(np.full((1, 4), 0.25), max_density=0.5).shape  # all four: dense
    (1, 4)
    """
    n = tl.shape(coefficients)[-1]
    if not _count_rows(coefficients):
        return coefficients
    # The widest row's support (one host sync), at least one entry.
    k = max(int((coefficients != 0).sum(-1).max()), 1)
    if k / n > max_density:
        return coefficients
    values, indices = _kernel("top_k")(coefficients, k)
    return SparseGate(indices, values + _nan_guard(coefficients), n)


def _count_rows(t: Tensor) -> int:
    return int(np.prod(tl.shape(t)[:-1], dtype=np.int64))


def topk_support(logits: Tensor, k: int, max_density: float = 1.0) -> Gate:
    r"""Top-k gating (:func:`mumoe.gates.topk`) as each row's support, without a dense detour.

    One selection of each row's ``k + 1`` largest logits gives the kept
    logits (softmax over them) and shows whether a tie crosses the ``k``-th
    place; where one does, the rule keeps every tied logit, so the dense
    coefficients are computed and :func:`sparsify` d instead (exact, and
    wider than ``k`` in those rows).  A row holding NaN or ``+inf`` is NaN
    throughout, as :func:`~mumoe.gates.topk`'s.

    Parameters
    ----------
    logits : tensor, shape (B, N)
    k : int
        Experts kept per row.
    max_density : float, default 1.0
        Above this share of ``N`` the dense coefficients are returned.

    Returns
    -------
    SparseGate or tensor
        Exactly :func:`~mumoe.gates.topk` ``(logits, k)``, sparse where ``k /
        N <= max_density``.

    Examples
    --------
    >>> import numpy as np
    >>> gate = topk_support(np.array([[0.0, 2.0, 1.0, 3.0]]), 2)
    >>> gate.indices, gate.values.round(3)
    (array([[3, 1]]), array([[0.731, 0.269]]))
    """
    k = check_top_k("topk", k)  # type: ignore[assignment]
    n = tl.shape(logits)[-1]
    if k >= n or k / n > max_density:
        return topk(logits, k)
    values, indices = _kernel("top_k")(logits, k + 1)
    if _count_rows(logits) and bool((values[..., k - 1] == values[..., k]).any()):
        return sparsify(topk(logits, k), max_density)
    kept = values[..., :k]
    e = tl.exp(kept - kept[..., :1])
    coefficients = e / tl.reshape(tl.sum(e, axis=-1), (*tl.shape(e)[:-1], 1))
    return SparseGate(indices[..., :k], coefficients + _nan_guard(logits), n)


def relu_topk_support(logits: Tensor, k: int, max_density: float = 1.0) -> Gate:
    r"""ReLU-top-k gating (:func:`mumoe.gates.relu_topk`, MxD's) as each row's support.

    As :func:`topk_support`: one selection of ``k + 1`` rectified logits;
    where a positive tie crosses the ``k``-th place, the dense coefficients
    are computed and sparsified instead.  Kept entries of 0 (rows with fewer
    than ``k`` positive logits) are carried with their value 0.

    Parameters
    ----------
    logits : tensor, shape (B, N)
    k : int
    max_density : float, default 1.0

    Returns
    -------
    SparseGate or tensor
        Exactly :func:`~mumoe.gates.relu_topk` ``(logits, k)``.

    Examples
    --------
    >>> import numpy as np
    >>> gate = relu_topk_support(np.array([[0.5, 2.0, -1.0, 1.0]]), 2)
    >>> gate.indices, gate.values
    (array([[1, 3]]), array([[2., 1.]]))
    """
    k = check_top_k("relu_topk", k)  # type: ignore[assignment]
    n = tl.shape(logits)[-1]
    if k >= n or k / n > max_density:
        return relu_topk(logits, k)
    # max(z, 0) with ReLU's gradient (0 at z = 0, as torch.relu): kept entries of 0 carry
    # none.  The guard reads the clipped logits, where NaN and +inf survive.
    rectified = tl.where(logits > 0, logits, tl.zeros(tl.shape(logits), **creation_context(logits)))
    values, indices = _kernel("top_k")(rectified, k + 1)
    boundary = values[..., k - 1]
    if _count_rows(logits) and bool(((boundary == values[..., k]) & (boundary > 0)).any()):
        return sparsify(relu_topk(logits, k), max_density)
    guard = _nan_guard(tl.clip(logits, 0, None))
    return SparseGate(indices[..., :k], values[..., :k] + guard, n)


#: The activations whose support is computed directly (the others are :func:`sparsify` d).
SPARSE_ACTIVATIONS: dict[str, Callable[..., Gate]] = {
    "topk": topk_support,
    "relu_topk": relu_topk_support,
}
