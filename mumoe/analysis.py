r"""Inspect and edit the experts of a trained μMoE model.

Index legend: ``S`` samples, ``N`` experts (``N_1 \cdots N_E`` joint experts
with several levels, in C order), ``C`` classes, ``k`` samples per expert.

The statistics (:func:`expert_load`, :func:`class_histogram`,
:func:`polysemanticity`, :func:`top_samples`) work on plain arrays of gate
coefficients, host (NumPy) arrays or anything NumPy can read, such as CPU
torch tensors; they need no torch.

Examples
--------
>>> import numpy as np
>>> coefficients = np.array([[0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])  # 3 samples, 2 experts
>>> labels = np.array([0, 1, 1])
>>> expert_load(coefficients)
array([2, 1])
>>> class_histogram(coefficients, labels, n_classes=2)
array([[1, 1],
       [0, 1]])
>>> polysemanticity(class_histogram(coefficients, labels, n_classes=2)).round(3)
array([0.707, 0.   ])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mumoe.validation import check_labels, host_array, positive_int

__all__ = [
    "class_histogram",
    "class_mass",
    "expert_coefficients",
    "expert_load",
    "mean_polysemanticity",
    "polysemanticity",
    "top_samples",
]


def _matrix(gates: Any, name: str = "gates") -> np.ndarray:
    matrix = host_array(gates)
    if matrix.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (samples, experts); got shape {matrix.shape} "
            "(use expert_coefficients to join several levels)"
        )
    if not np.issubdtype(matrix.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got {matrix.dtype}")
    return matrix


def _threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold must be a number, got {threshold!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return float(threshold)


def expert_coefficients(gates: Any) -> np.ndarray:
    r"""The coefficient of every (joint) expert, one row per sample.

    With one level this is the gate itself.  With :math:`E` levels the
    expert :math:`(n_1, \dots, n_E)` has coefficient
    :math:`a^{(1)}_{n_1} \cdots a^{(E)}_{n_E}`, the factor that multiplies
    its weight matrix in Eq. 1; experts are numbered in C order
    (``np.ravel_multi_index``).

    Parameters
    ----------
    gates : array or sequence of arrays, each (..., N_e)
        The gates of one layer (as :func:`collect_gates` or
        :func:`mumoe.nn.record_gates` give them); leading dimensions (batch,
        tokens) are flattened into samples.

    Returns
    -------
    numpy.ndarray, shape (S, N_1 \cdots N_E)

    Examples
    --------
    >>> import numpy as np
    >>> expert_coefficients([np.array([[0.5, 0.5]]), np.array([[1.0, 0.0, 0.0]])])
    array([[0.5, 0. , 0. , 0.5, 0. , 0. ]])
    """
    levels = [gates] if hasattr(gates, "shape") else list(gates)
    if not levels:
        raise ValueError("gates must hold at least one level")
    arrays = [host_array(a) for a in levels]
    lead = arrays[0].shape[:-1]
    for e, a in enumerate(arrays):
        if a.ndim == 0 or a.shape[:-1] != lead:
            raise ValueError(
                f"every level's gate must have shape (..., N_e) with the same leading "
                f"dimensions; level 0 has {arrays[0].shape}, level {e} has {a.shape}"
            )
    rows = math.prod(lead)
    joint = arrays[0].reshape(rows, -1)
    for a in arrays[1:]:
        joint = (joint[:, :, None] * a.reshape(rows, 1, -1)).reshape(rows, -1)
    return joint


def expert_load(gates: Any, threshold: float = 0.5) -> np.ndarray:
    r"""How many samples each expert processes: coefficient :math:`\ge` ``threshold``.

    Parameters
    ----------
    gates : array, shape (S, N)
        Gate coefficients (:func:`expert_coefficients` for several levels).
    threshold : float in (0, 1], default 0.5
        The paper's choice: an expert *processes* a sample when its
        coefficient is at least 0.5, which holds for at most one expert per
        sample of a level (the coefficients sum to one).

    Returns
    -------
    numpy.ndarray of int, shape (N,)

    Examples
    --------
    >>> import numpy as np
    >>> expert_load(np.array([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]]))
    array([2, 2])
    """
    matrix = _matrix(gates)
    return (matrix >= _threshold(threshold)).sum(axis=0)


def class_histogram(
    gates: Any, labels: Any, *, n_classes: int | None = None, threshold: float = 0.5
) -> np.ndarray:
    r"""Per expert, the classes of the samples it processes.

    .. math::
        H_{nc} = \#\{s : y_s = c,\ a_{sn} \ge \tau\}

    Parameters
    ----------
    gates : array, shape (S, N)
    labels : array of int, shape (S,)
        The class of each sample.
    n_classes : int, optional
        :math:`C`; by default one more than the largest label.
    threshold : float in (0, 1], default 0.5
        :math:`\tau`, as for :func:`expert_load`.

    Returns
    -------
    numpy.ndarray of int, shape (N, C)

    Examples
    --------
    >>> import numpy as np
    >>> coefficients = np.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    >>> class_histogram(coefficients, [0, 1, 1], n_classes=3)
    array([[1, 1, 0],
           [0, 1, 0]])
    """
    matrix = _matrix(gates)
    classes, n_classes = check_labels(labels, matrix.shape[0], n_classes)
    processed = (matrix >= _threshold(threshold)).astype(np.int64)  # (S, N)
    onehot = np.eye(n_classes, dtype=np.int64)[classes]  # (S, C)
    return processed.T @ onehot


def class_mass(gates: Any, labels: Any, *, n_classes: int | None = None) -> np.ndarray:
    r"""Per expert, the gate coefficient it receives from each class.

    .. math::
        M_{nc} = \sum_{s : y_s = c} a_{sn}

    The soft counterpart of :func:`class_histogram`, with no threshold: an
    expert that takes part in many mixtures at small coefficients is
    counted too.  ``M.sum(1)`` is each expert's share of the routing, in
    samples (the rows of ``M`` sum to the number of samples when the
    coefficients of each sample sum to one).

    Parameters
    ----------
    gates : array, shape (S, N)
    labels : array of int, shape (S,)
    n_classes : int, optional

    Returns
    -------
    numpy.ndarray of float, shape (N, C)

    Examples
    --------
    >>> import numpy as np
    >>> class_mass(np.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]]), [0, 1, 1])
    array([[0.7, 0.8],
           [0.3, 1.2]])
    """
    matrix = _matrix(gates)
    classes, n_classes = check_labels(labels, matrix.shape[0], n_classes)
    return matrix.T @ np.eye(n_classes, dtype=matrix.dtype)[classes]


def polysemanticity(histogram: Any, *, min_count: int = 1) -> np.ndarray:
    r"""Class-level polysemanticity of each expert (lower is more specialised).

    For expert :math:`n` with class histogram :math:`H_n` (from
    :func:`class_histogram` or :func:`counterfactual_histogram`), let
    :math:`p_n = H_n / \sum_c H_{nc}` be the distribution of classes it is
    responsible for and :math:`c^\ast = \arg\max_c p_{nc}` its dominant
    class.  Its polysemanticity is the Euclidean distance from that
    distribution to the one-hot vector of its dominant class:

    .. math::
        \psi_n = \bigl\lVert p_n - e_{c^\ast} \bigr\rVert_2
               = \sqrt{(1 - p_{nc^\ast})^2 + \textstyle\sum_{c \ne c^\ast} p_{nc}^2}

    :math:`\psi_n = 0` for an expert tied to a single class and
    :math:`\sqrt{1 - 1/C}` (its maximum) for one spread evenly over all
    :math:`C` classes.  This is our reading of the measure of Oldfield et
    al. (2024, Sec. 4.1), which averages it over the experts that are
    responsible for enough samples; experts with fewer than ``min_count``
    samples get NaN here and are left out of :func:`mean_polysemanticity`.

    Parameters
    ----------
    histogram : array, shape (N, C)
        Counts (:func:`class_histogram`, :func:`counterfactual_histogram`) or
        coefficient mass (:func:`class_mass`).
    min_count : int, default 1
        Experts whose histogram sums to less are NaN.

    Returns
    -------
    numpy.ndarray of float, shape (N,)

    Examples
    --------
    >>> import numpy as np
    >>> polysemanticity(np.array([[5, 0, 0], [2, 2, 2], [0, 0, 0]])).round(3)
    array([0.   , 0.816,   nan])
    """
    counts = host_array(histogram)
    if counts.ndim != 2:
        raise ValueError(f"histogram must be 2-D (experts, classes), got shape {counts.shape}")
    min_count = positive_int(min_count, "min_count")
    if np.any(counts < 0):
        raise ValueError("histogram counts must be non-negative")
    totals = counts.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / totals[:, None]
    distance = p.copy()
    distance[np.arange(len(p)), np.argmax(counts, axis=1)] -= 1.0
    psi = np.sqrt(np.sum(distance**2, axis=1))
    psi[totals < min_count] = np.nan
    return psi


def mean_polysemanticity(histogram: Any, *, min_count: int = 1) -> float:
    """The mean of :func:`polysemanticity` over experts with at least ``min_count`` samples.

    Returns NaN when no expert has that many.

    Parameters
    ----------
    histogram : array, shape (N, C)
        As for :func:`polysemanticity`.
    min_count : int, default 1

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> round(mean_polysemanticity(np.array([[5, 0], [1, 1], [0, 1]]), min_count=2), 3)
    0.354
    """
    psi = polysemanticity(histogram, min_count=min_count)
    kept = psi[~np.isnan(psi)]
    return float(kept.mean()) if kept.size else math.nan


def top_samples(gates: Any, k: int = 8) -> np.ndarray:
    """The samples each expert weights most, largest coefficient first.

    Parameters
    ----------
    gates : array, shape (S, N)
    k : int, default 8
        Samples per expert, at most ``S``.

    Returns
    -------
    numpy.ndarray of int, shape (N, k)
        Sample indices; ties keep the sample order.  Check the coefficients
        themselves to tell an expert's true favourites from zeros.

    Examples
    --------
    >>> import numpy as np
    >>> top_samples(np.array([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4]]), k=2)
    array([[1, 2],
           [0, 2]])
    """
    matrix = _matrix(gates)
    k = positive_int(k, "k")
    if k > matrix.shape[0]:
        raise ValueError(f"k must be an int in [1, {matrix.shape[0]}] (the samples), got {k!r}")
    order = np.argsort(-matrix, axis=0, kind="stable")[:k]
    return order.T.copy()
