r"""Exact entmax-1.5 and sparsemax by a candidate window: the one implementation of both.

Both map logits :math:`z \in \mathbb{R}^N` to the simplex through a threshold
:math:`\tau` (Peters et al., 2019; Martins & Astudillo, 2016):

* sparsemax: :math:`p = \max(z - \tau, 0)`, :math:`\sum p = 1`;
* entmax-1.5: :math:`p = \max(u - \tau, 0)^2` with :math:`u = z/2`, :math:`\sum p = 1`.

The exact threshold comes from the sorted logits (the formulas of the
``entmax`` package, so the results agree with it to rounding): for the
:math:`k` largest, :math:`\tau_k` solves the equation on those :math:`k`, and
the support is the number of :math:`k` with :math:`\tau_k \le z_{(k)}`.

Sorting a whole row is what made these gates slow: gate supports are small
(tens of experts out of thousands), so only the row's largest logits matter.
The algorithm (the ``entmax`` package's, with a selection instead of its
partial sort):

1. select the ``W = WINDOW`` largest logits of each row (``partition``: linear
   time, no sort of the row) and sort only those;
2. read the threshold and the support size from the sorted window;
3. a row whose support fills its window may reach beyond it: only those rows
   are done again with a window twice as wide, until the support ends inside
   the window or the window is the row.  The result is then exact: a prefix
   sum over the sorted window equals the same prefix sum over the sorted row,
   and the support ends at the first :math:`k` where the test fails;
4. one elementwise pass for the coefficients.

On gate logits of unit variance the support of entmax-1.5 is 10 to 60 experts
for N from 64 to 24,576 (sparsemax: 3 to 10), inside the first window of 64.
Arrays whose shapes must be static (JAX) use the whole row as the window.

The functions take any NumPy-API array module ``xp`` (``numpy``, ``cupy``,
``jax.numpy``): this is the array-API form of the activations, which CuPy and
JAX run, and PyTorch off the CPU (:mod:`mumoe.nn`, with ``torch.topk``
as the selection).  On the CPU, NumPy arrays and PyTorch tensors run the
compiled kernels of :mod:`mumoe.gates.entmax_cpu` instead (declared in
``mumoe/backends/numpy.toml``): no sort, and several times faster than this
(``python -m benchmarks.activations``).

Precision: float16 and bfloat16 logits are computed in float32, and float32
windows take their prefix sums in float64 (except under JAX); the coefficients
keep the logits' dtype.

Non-finite logits: a ``-inf`` logit gets an exact 0; a row with a NaN or
``+inf``, or with every logit ``-inf``, gets NaN coefficients (as softmax).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

__all__ = ["WINDOW", "entmax15", "namespace", "sparsemax", "threshold"]

#: The first window: the largest logits of each row that are sorted.
WINDOW = 64

#: Dtypes computed in float32 and cast back (their prefix sums cannot hold the simplex).
_NARROW = frozenset({"float16", "bfloat16"})


def namespace(array: Any) -> Any:
    """The NumPy-API module of ``array``: ``numpy``, ``cupy`` or ``jax.numpy``.

    Parameters
    ----------
    array : array
        A NumPy, CuPy or JAX array (anything else counts as NumPy's).

    Returns
    -------
    module

    Examples
    --------
    >>> import numpy as np
    >>> namespace(np.zeros(2)).__name__
    'numpy'
    """
    root = type(array).__module__.partition(".")[0]
    if root == "cupy":
        return sys.modules["cupy"]
    if root in ("jax", "jaxlib"):
        return sys.modules["jax.numpy"]
    import numpy

    return numpy


def _static_shapes(xp: Any) -> bool:
    return bool(xp.__name__.startswith("jax"))


def _window_threshold(z: Any, m: Any, kind: str, width: int, xp: Any) -> tuple[Any, Any]:
    """Threshold and support size of each row of ``z``, read from its ``width`` largest."""
    # Array methods and slices, not xp.flip / xp.take_along_axis: NumPy's function API
    # costs microseconds a call, which is the whole budget of a one-token gate.
    n = z.shape[-1]
    window = z if width >= n else xp.partition(z, n - width, axis=-1)[..., n - width :]
    ordered = xp.sort(window, axis=-1)[..., ::-1] - m
    if ordered.dtype == xp.float32 and not _static_shapes(xp):
        # The prefix sums below cancel: in float32 a threshold came out 16 ulps off (1e-6
        # in a coefficient).  The window is small: it is summed in float64.
        ordered = ordered.astype(xp.float64)
    rank = xp.arange(1, width + 1, dtype=ordered.dtype)
    if kind == "sparsemax":
        cumulative = xp.cumsum(ordered, axis=-1) - 1
        inside = rank * ordered > cumulative
        taus = cumulative / rank
    else:
        us = ordered * 0.5
        # The entmax package's tau_k = mean_k - sqrt((1 - ss_k) / k) with ss_k the squared
        # deviations of the k largest, written with the prefix sums c1, c2 of u and u^2:
        # tau_k = (c1 - sqrt(c1^2 + k (1 - c2))) / k.  (Not a matrix product with a
        # triangle of ones, faster alone: NumPy's BLAS threads and torch's OpenMP threads,
        # taking turns, spin against each other, 0.3 ms -> 8 ms on 2 cores.)
        c1, c2 = xp.cumsum(us, axis=-1), xp.cumsum(us * us, axis=-1)
        disc = c1 * c1 + rank * (1 - c2)  # NaN where a -inf logit is in: never support
        if _static_shapes(xp):  # JAX differentiates: no 0 * inf from sqrt at 0
            positive = disc > 0
            root = xp.where(positive, xp.sqrt(xp.where(positive, disc, 1)), 0)
            root = xp.where(disc <= 0, 0, xp.where(positive, root, disc))
        else:
            root = xp.sqrt(xp.maximum(disc, 0))  # NaN stays NaN
        taus = (c1 - root) / rank
        inside = taus <= us
    # The support is k = 1..k*, and tau_k <= tau* there with equality at k*: the
    # threshold is the largest tau_k of the support (a NaN row has none: -inf, and its
    # coefficients are NaN through the maximum).
    tau = xp.where(inside, taus, -xp.inf).max(axis=-1, keepdims=True)
    return tau.astype(z.dtype), inside.sum(axis=-1, keepdims=True)


def threshold(z: Any, kind: str, xp: Any = None, m: Any = None) -> tuple[Any, Any]:
    """The row maximum and the exact threshold of entmax-1.5 or sparsemax.

    Parameters
    ----------
    z : array, shape (B, N)
        Logits, ``N >= 1``.
    kind : {"entmax15", "sparsemax"}
    xp : module, optional
        The array module (:func:`namespace` of ``z`` by default).
    m : array, shape (B, 1), optional
        The row maximum, where the caller has it.

    Returns
    -------
    m, tau : arrays, shape (B, 1)
        The row maximum, and the threshold of the shifted logits: ``z - m``
        for sparsemax, ``(z - m) / 2`` for entmax-1.5.

    Examples
    --------
    >>> import numpy as np
    >>> threshold(np.array([[1.0, 0.5, -3.0]]), "sparsemax")
    (array([[1.]]), array([[-0.75]]))
    """
    if kind not in ("entmax15", "sparsemax"):
        raise ValueError(f"kind must be 'entmax15' or 'sparsemax', got {kind!r}")
    xp = namespace(z) if xp is None else xp
    m = z.max(axis=-1, keepdims=True) if m is None else m
    n = z.shape[-1]
    width = n if _static_shapes(xp) else min(n, WINDOW)
    tau, support = _window_threshold(z, m, kind, width, xp)
    pending = None  # the rows whose support fills their window (indices into z)
    while width < n:
        full = xp.nonzero(support[:, 0] >= width)[0]
        if full.shape[0] == 0:
            break
        pending = full if pending is None else pending[full]
        width = min(2 * width, n)
        tau_more, support = _window_threshold(z[pending], m[pending], kind, width, xp)
        tau[pending] = tau_more
    return m, tau


def _quiet(xp: Any) -> Any:
    """NumPy quiet on rows with non-finite logits: their NaNs are the documented result."""
    if xp.__name__ == "numpy":
        return xp.errstate(invalid="ignore")
    return contextlib.nullcontext()


def _coefficients(z: Any, kind: str, xp: Any) -> Any:
    """The activation ``kind`` over the last axis: the threshold, then one elementwise pass."""
    xp = namespace(z) if xp is None else xp
    shape = tuple(z.shape)
    if 0 in shape:  # no rows, or rows of no logits
        return xp.zeros(shape, dtype=z.dtype)
    rows = z.reshape(-1, shape[-1])
    narrow = str(z.dtype).rsplit(".", 1)[-1] in _NARROW
    if narrow:  # in float16 the window's prefix sums took a row to a sum of 0.82
        rows = rows.astype(xp.float32)
    with _quiet(xp):
        m, tau = threshold(rows, kind, xp)
        if kind == "sparsemax":
            p = xp.maximum(rows - m - tau, 0)
        else:
            p = xp.maximum((rows - m) * 0.5 - tau, 0)
            p = p * p
    return (p.astype(z.dtype) if narrow else p).reshape(shape)


def sparsemax(z: Any, xp: Any = None) -> Any:
    """Sparsemax over the last axis of a NumPy-API array (no gradient).

    Parameters
    ----------
    z : array, shape (..., N)
    xp : module, optional

    Returns
    -------
    array, shape (..., N)

    Examples
    --------
    >>> import numpy as np
    >>> sparsemax(np.array([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0]])).round(3)
    array([[1.   , 0.   , 0.   ],
           [0.333, 0.333, 0.333]])
    """
    return _coefficients(z, "sparsemax", xp)


def entmax15(z: Any, xp: Any = None) -> Any:
    """entmax-1.5 over the last axis of a NumPy-API array (no gradient).

    Parameters
    ----------
    z : array, shape (..., N)
    xp : module, optional

    Returns
    -------
    array, shape (..., N)

    Examples
    --------
    >>> import numpy as np
    >>> entmax15(np.array([[0.0, 0.0], [3.0, -3.0]]))
    array([[0.5, 0.5],
           [1. , 0. ]])
    """
    return _coefficients(z, "entmax15", xp)
