r"""Gating on any TensorLy backend: the activations and normalisations, inference mode.

The same gate as :class:`mumoe.nn.MuMoEGate`, written with TensorLy operations
so that a model trained in PyTorch serves on NumPy or CuPy:

.. math::
    a^{(e)} = \phi\bigl(\mathrm{norm}(x G_e)\bigr)

with ``norm`` batch normalisation from running statistics (eval mode), layer
normalisation, or nothing, and :math:`\phi` one of :data:`ACTIVATIONS`.

entmax-1.5 and sparsemax use the sort-based exact algorithms (Peters et al.,
2019; Martins & Astudillo, 2016): for logits sorted in decreasing order
:math:`z_{(1)} \ge \dots \ge z_{(N)}`,

* sparsemax: :math:`\tau = (\sum_{j \le k} z_{(j)} - 1) / k` with
  :math:`k = \max\{k : 1 + k z_{(k)} > \sum_{j \le k} z_{(j)}\}`, and
  :math:`p = \max(z - \tau, 0)`;
* entmax-1.5 on :math:`u = z/2`: for each :math:`k`,
  :math:`\tau_k = \bar u_k - \sqrt{\max(0, (1 - s_k)/k)}` with
  :math:`\bar u_k` the mean and :math:`s_k` the sum of squared deviations of
  the :math:`k` largest; the support is the number of :math:`k` with
  :math:`\tau_k \le u_{(k)}`, and :math:`p = \max(u - \tau, 0)^2`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorly as tl

from mumoe.backend import creation_context
from mumoe.typing import Tensor

__all__ = [
    "ACTIVATIONS",
    "batch_norm",
    "entmax15",
    "gate_coefficients",
    "gelu",
    "layer_norm",
    "softmax",
    "sparsemax",
]


def _keep(reduced: Tensor, like: Tensor) -> Tensor:
    # Put back the reduced last axis (TensorLy's backends disagree on keepdims).
    return tl.reshape(reduced, (*tl.shape(like)[:-1], 1))


def _ones(z: Tensor) -> Tensor:
    return tl.ones(tl.shape(z), **creation_context(z))


def _zeros(z: Tensor) -> Tensor:
    return _ones(z) * 0


def _sorted_desc(z: Tensor) -> Tensor:
    return tl.flip(tl.sort(z, axis=-1), axis=-1)


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
    z = logits - _keep(tl.max(logits, axis=-1), logits)
    zs = _sorted_desc(z)
    rank = tl.cumsum(_ones(zs), axis=-1)
    cumulative = tl.cumsum(zs, axis=-1)
    inside = tl.where(1 + rank * zs > cumulative, _ones(zs), _zeros(zs))
    support = _keep(tl.sum(inside, axis=-1), zs)
    selected = tl.where(rank == support, cumulative, _zeros(zs))
    tau = (_keep(tl.sum(selected, axis=-1), zs) - 1) / support
    return tl.clip(z - tau, 0, None)


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
    u = (logits - _keep(tl.max(logits, axis=-1), logits)) / 2
    us = _sorted_desc(u)
    rank = tl.cumsum(_ones(us), axis=-1)
    mean = tl.cumsum(us, axis=-1) / rank
    mean_sq = tl.cumsum(us * us, axis=-1) / rank
    spread = rank * (mean_sq - mean * mean)
    tau = mean - tl.sqrt(tl.clip((1 - spread) / rank, 0, None))
    inside = tl.where(tau <= us, _ones(us), _zeros(us))
    support = _keep(tl.sum(inside, axis=-1), us)
    tau_star = _keep(tl.sum(tl.where(rank == support, tau, _zeros(us)), axis=-1), us)
    p = tl.clip(u - tau_star, 0, None)
    return p * p


#: The gate activations by name, as in :data:`mumoe.nn.ACTIVATIONS`.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "entmax15": entmax15,
    "sparsemax": sparsemax,
    "softmax": softmax,
}


def gelu(x: Tensor) -> Tensor:
    r"""GELU, exactly as ``torch.nn.GELU()``.

    :math:`x \Phi(x) = \tfrac{x}{2}(1 + \mathrm{erf}(x/\sqrt{2}))`.

    The error function is the active backend's, as declared in ``backends/``
    (TensorLy has none).

    Parameters
    ----------
    x : tensor

    Returns
    -------
    tensor
        Of the shape and dtype of ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> gelu(np.array([0.0, 1.0]))  # doctest: +ELLIPSIS
    array([0.        , 0.841344...])
    """
    from mumoe.backend import backend_erf

    return x * (1 + backend_erf()(x * 0.7071067811865476)) / 2


def batch_norm(logits: Tensor, mean: Tensor, var: Tensor, eps: float = 1e-5) -> Tensor:
    """Batch normalisation without affine parameters, from running statistics (eval mode).

    Parameters
    ----------
    logits : tensor, shape (B, N)
    mean, var : tensor, shape (N,)
        The running mean and (unbiased) variance, as ``torch.nn.BatchNorm1d``
        keeps them.
    eps : float, default 1e-5

    Returns
    -------
    tensor, shape (B, N)
        ``(logits - mean) / sqrt(var + eps)``.

    Examples
    --------
    >>> import numpy as np
    >>> batch_norm(np.array([[1.0, 4.0]]), np.array([1.0, 2.0]), np.array([1.0, 4.0]), eps=0.0)
    array([[0., 1.]])
    """
    return (logits - mean) / tl.sqrt(var + eps)


def layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Layer normalisation over the last axis (biased variance, as ``torch.nn.LayerNorm``).

    Parameters
    ----------
    x : tensor, shape (..., D)
    weight, bias : tensor, shape (D,), optional
        The affine parameters; none by default.
    eps : float, default 1e-5

    Returns
    -------
    tensor, shape (..., D)

    Examples
    --------
    >>> import numpy as np
    >>> layer_norm(np.array([[1.0, 3.0]]), eps=0.0)
    array([[-1.,  1.]])
    """
    mean = _keep(tl.mean(x, axis=-1), x)
    centred = x - mean
    var = _keep(tl.mean(centred * centred, axis=-1), x)
    out = centred / tl.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def gate_coefficients(
    x: Tensor,
    projections: Sequence[Tensor],
    norms: Sequence[Callable[[Tensor], Tensor] | None],
    activation: Callable[[Tensor], Tensor],
) -> list[Tensor]:
    """The gate coefficients ``activation(norm(x @ G_e))`` of every level.

    Parameters
    ----------
    x : tensor, shape (..., I)
    projections : sequence of tensors, each (I, N_e)
        The gate projections :math:`G_e`.
    norms : sequence of callables or None
        Applied to the logits flattened to ``(B, N_e)`` (None: no norm).
    activation : callable
        From logits ``(B, N_e)`` to coefficients, such as :func:`entmax15`.

    Returns
    -------
    list of tensors, each (..., N_e)

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((2, 3, 4))
    >>> [a.shape for a in gate_coefficients(x, [np.zeros((4, 5))], [None], softmax)]
    [(2, 3, 5)]
    """
    rows = tl.reshape(x, (-1, tl.shape(x)[-1]))
    gates = []
    for projection, norm in zip(projections, norms, strict=True):
        logits = tl.dot(rows, projection)
        if norm is not None:
            logits = norm(logits)
        gates.append(tl.reshape(activation(logits), (*tl.shape(x)[:-1], tl.shape(projection)[-1])))
    return gates
