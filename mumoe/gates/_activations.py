r"""The gate activations' kernels on any TensorLy backend: logits to non-negative coefficients.

The kernels of the names of :data:`mumoe.gates.ACTIVATIONS`:

* entmax-1.5 and sparsemax, exact: a backend that declares its kernels of them
  (``entmax15`` / ``sparsemax`` in ``mumoe/backends/<name>.toml``) runs those, so
  every layer on a backend shares one implementation (NumPy's are compiled for
  the CPU, :mod:`mumoe.gates.entmax_cpu`); the other backends run
  :mod:`mumoe.gates.entmax`'s candidate-window algorithm on their own arrays (a
  selection of each row's largest logits, a sort of those only);

* top-k: softmax over the logits at or above the row's :math:`k`-th
  largest, :math:`p \propto e^{z} [z \ge z_{(k)}]`, with :math:`z_{(k)}` from a
  selection (the backend's declared ``kth_largest``), not a sort;

* ReLU-top-k (MxD's gate): :math:`a = r\,[r \ge r_{(k)}]` with :math:`r = \max(z, 0)`,
  the ``k`` largest rectified logits kept as they are, not normalised.

All but ReLU-top-k put each row on the probability simplex.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorly as tl

from mumoe.backends import backend_function, creation_context
from mumoe.gates import entmax as window
from mumoe.typing import Tensor

__all__ = [
    "TOP_K_ACTIVATIONS",
    "check_top_k",
    "entmax15",
    "kth_largest_by_partition",
    "kth_largest_by_top_k",
    "relu_topk",
    "softmax",
    "sparsemax",
    "topk",
]


def _keep(reduced: Tensor, like: Tensor) -> Tensor:
    # Put back the reduced last axis (TensorLy's backends disagree on keepdims).
    return tl.reshape(reduced, (*tl.shape(like)[:-1], 1))


def _ones(z: Tensor) -> Tensor:
    return tl.ones(tl.shape(z), **creation_context(z))


def _zeros(z: Tensor) -> Tensor:
    return _ones(z) * 0


def softmax(logits: Tensor) -> Tensor:
    """Softmax over the last axis.

    Parameters
    ----------
    logits : tensor, shape (..., N)

    Returns
    -------
    tensor, shape (..., N)
        Non-negative, summing to one over the last axis.

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.zeros((1, 4)))
    array([[0.25, 0.25, 0.25, 0.25]])
    """
    e = tl.exp(logits - _keep(tl.max(logits, axis=-1), logits))
    return e / _keep(tl.sum(e, axis=-1), e)


def sparsemax(logits: Tensor) -> Tensor:
    """Sparsemax over the last axis: the Euclidean projection onto the simplex.

    Parameters
    ----------
    logits : tensor, shape (..., N)

    Returns
    -------
    tensor, shape (..., N)
        Non-negative, summing to one over the last axis.
        Exact zeros where a logit is far enough below the largest.

    Examples
    --------
    >>> import numpy as np
    >>> sparsemax(np.array([[2.0, 1.0, -1.0]]))
    array([[1., 0., 0.]])
    """
    return _declared_or_window("sparsemax", logits)


def entmax15(logits: Tensor) -> Tensor:
    """entmax-1.5 over the last axis: sparse, and smoother than sparsemax.

    Parameters
    ----------
    logits : tensor, shape (..., N)

    Returns
    -------
    tensor, shape (..., N)
        Non-negative, summing to one over the last axis.
        Exact zeros where a logit is far enough below the largest.

    Examples
    --------
    >>> import numpy as np
    >>> entmax15(np.array([[0.0, 0.0]]))
    array([[0.5, 0.5]])
    """
    return _declared_or_window("entmax15", logits)


def _declared_or_window(kind: str, logits: Tensor) -> Tensor:
    kernel = backend_function(tl.get_backend(), kind)
    if kernel is not None:
        return kernel(logits)
    return window.entmax15(logits) if kind == "entmax15" else window.sparsemax(logits)


def kth_largest_by_partition(z: Tensor, k: int) -> Tensor:
    """The ``k``-th largest entry of each row, by the array library's ``partition``.

    ``numpy.partition`` selects in linear time (introselect) without sorting
    the row; CuPy arrays dispatch to ``cupy.partition``.  The ``kth_largest``
    kernel ``mumoe/backends/numpy.toml`` and ``cupy.toml`` declare.

    Parameters
    ----------
    z : array, shape (..., N)
    k : int
        From 1 to N.

    Returns
    -------
    array, shape (..., 1)

    Examples
    --------
    >>> import numpy as np
    >>> kth_largest_by_partition(np.array([[3.0, 9.0, 1.0, 7.0]]), 2)
    array([[7.]])
    """
    n = z.shape[-1]
    return np.partition(z, n - k, axis=-1)[..., n - k : n - k + 1]


def kth_largest_by_top_k(z: Tensor, k: int) -> Tensor:
    """The ``k``-th largest entry of each row, by ``jax.lax.top_k`` (no full sort).

    The ``kth_largest`` kernel ``mumoe/backends/jax.toml`` declares.

    Parameters
    ----------
    z : jax array, shape (..., N)
    k : int
        From 1 to N.

    Returns
    -------
    jax array, shape (..., 1)

    Examples
    --------
    >>> import jax.numpy as jnp  # doctest: +SKIP
    >>> kth_largest_by_top_k(jnp.array([[3.0, 9.0, 1.0, 7.0]]), 2)  # doctest: +SKIP
    Array([[7.]], dtype=float32)
    """
    import jax

    return jax.lax.top_k(jax.lax.stop_gradient(z), k)[0][..., k - 1 : k]


#: The activations that take ``top_k``.
TOP_K_ACTIVATIONS = ("topk", "relu_topk")


def check_top_k(activation: Any, top_k: Any) -> int | None:
    """Return ``top_k`` as an int for a top-k activation, None if it is not given.

    Parameters
    ----------
    activation : str or callable
    top_k : int or None
        The number of experts each row keeps, for ``activation="topk"`` or
        ``"relu_topk"`` only.

    Returns
    -------
    int or None

    Raises
    ------
    ValueError
        If a top-k activation comes without ``top_k`` or with ``top_k < 1``,
        or ``top_k`` comes with another activation.
    TypeError
        If ``top_k`` is not an int.

    Examples
    --------
    >>> check_top_k("topk", 2), check_top_k("relu_topk", 8), check_top_k("entmax15", None)
    (2, 8, None)
    """
    if isinstance(activation, str) and activation in TOP_K_ACTIVATIONS:
        if top_k is None:
            raise ValueError(
                f"activation={activation!r} needs top_k, the number of experts each row keeps"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise TypeError(f"top_k must be an int, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        return int(top_k)
    if top_k is not None:
        name = activation if isinstance(activation, str) else getattr(activation, "__name__", "")
        raise ValueError(
            f"top_k={top_k!r} is for activation='topk' or 'relu_topk'; the activation is "
            f"{name or 'custom'!r}"
        )
    return None


def _kth_largest(logits: Tensor, k: int, what: str) -> Tensor:
    backend = tl.get_backend()
    select = backend_function(backend, "kth_largest")
    if select is None:
        raise ValueError(
            f"{what} gating on backend {backend!r} needs a kth_largest kernel in mumoe/backends/"
        )
    return select(logits, k)


def topk(logits: Tensor, k: int) -> Tensor:
    """Top-k gating: softmax over the ``k`` largest logits of each row, exact zeros elsewhere.

    A row keeps the logits at or above its ``k``-th largest value, so logits
    tied with it are all kept: the rule treats every expert alike (permuting
    the logits permutes the coefficients) and is the same on every backend.
    A row keeps more than ``k`` experts only on such exact ties, such as the
    equal logits of a zero-initialised gate, where top-k is softmax.
    ``k >= N`` is softmax.  A row holding NaN or ``+inf`` gets NaN
    coefficients throughout, as softmax's, on every backend.  The ``k``-th
    largest value comes from the backend's declared ``kth_largest`` kernel, a
    selection rather than a sort of the row; the rest is elementwise and
    differentiable where the backend is (the selection carries no gradient,
    as in any top-k router).

    Parameters
    ----------
    logits : tensor, shape (..., N)
    k : int
        Experts kept per row, at least 1.

    Returns
    -------
    tensor, shape (..., N)
        Non-negative, summing to one over the last axis, zero outside the
        ``k`` largest logits (and their ties).

    Raises
    ------
    ValueError
        If ``k < 1``, or the backend declares no ``kth_largest`` kernel.

    Examples
    --------
    >>> import numpy as np
    >>> topk(np.array([[0.0, 2.0, 1.0, 2.0]]), 2)
    array([[0. , 0.5, 0. , 0.5]])
    >>> topk(np.array([[3.0, 1.0, 1.0, 0.0]]), 2)[0].round(3)  # a tie at the 2nd: both kept
    array([0.787, 0.107, 0.107, 0.   ])
    """
    k = check_top_k("topk", k)  # type: ignore[assignment]
    if k >= tl.shape(logits)[-1]:
        return softmax(logits)
    kth = _kth_largest(logits, k, "top-k")
    e = tl.exp(logits - _keep(tl.max(logits, axis=-1), logits))
    e = tl.where(logits >= kth, e, _zeros(e))
    return e / _keep(tl.sum(e, axis=-1), e)


def relu_topk(logits: Tensor, k: int) -> Tensor:
    r"""ReLU-top-k gating (MxD's): the ``k`` largest rectified logits of each row, unnormalised.

    :math:`a = r\,[r \ge r_{(k)}]` with :math:`r = \max(z, 0)` and
    :math:`r_{(k)}` the row's ``k``-th largest: the coefficients are the
    rectified logits themselves, not a distribution (rows sum to anything
    non-negative, and a row of non-positive logits is all zeros).  As for
    :func:`topk`, entries tied with the ``k``-th largest are all kept, so a
    row keeps more than ``k`` experts only on exact ties (zeros aside); ``k >=
    N`` is ReLU.  A row holding NaN or ``+inf`` is NaN throughout, on every
    backend.  The gradient is 1 on the kept positive entries, 0 elsewhere.

    Parameters
    ----------
    logits : tensor, shape (..., N)
    k : int
        Experts kept per row, at least 1.

    Returns
    -------
    tensor, shape (..., N)
        Non-negative, at most ``k`` non-zero entries per row (ties aside).

    Raises
    ------
    ValueError
        If ``k < 1``, or the backend declares no ``kth_largest`` kernel.

    Examples
    --------
    >>> import numpy as np
    >>> relu_topk(np.array([[0.5, 2.0, -1.0, 1.0]]), 2)
    array([[0., 2., 0., 1.]])
    >>> relu_topk(np.array([[-1.0, -2.0, 0.5]]), 2)  # one positive logit: one expert
    array([[0. , 0. , 0.5]])
    """
    k = check_top_k("relu_topk", k)  # type: ignore[assignment]
    # max(z, 0) with ReLU's gradient, 0 at z = 0 (as torch.relu; a clip passes 1 there).
    rectified = tl.where(logits > 0, logits, _zeros(logits))
    # NaN or +inf anywhere in a row: the whole row NaN (its largest minus itself; the
    # clip keeps NaN, which the where above turned into 0).
    clipped = tl.clip(logits, 0, None)
    top = _keep(tl.max(clipped, axis=-1), clipped)
    if k < tl.shape(logits)[-1]:
        kth = _kth_largest(rectified, k, "ReLU-top-k")
        rectified = tl.where(rectified >= kth, rectified, _zeros(rectified))
    return rectified + (top - top)
