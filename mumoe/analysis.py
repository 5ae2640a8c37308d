r"""Inspect and edit the experts of a trained μMoE model.

Index legend: ``S`` samples, ``N`` experts (``N_1 \cdots N_E`` joint experts
with several levels, in C order), ``C`` classes, ``k`` samples per expert.

The statistics (:func:`expert_load`, :func:`class_histogram`,
:func:`polysemanticity`, :func:`top_samples`) work on plain arrays of gate
coefficients, host (NumPy) arrays or anything NumPy can read, such as CPU
torch tensors; they need no torch.  Over a data set too large to hold,
:class:`mumoe.gates.GateStatistics` accumulates them chunk by chunk in memory that does
not grow with the data, and the functions take an iterator of chunks.

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
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from mumoe.gates import GateStatistics, check_threshold
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


def _chunked(gates: Any) -> bool:
    # An array, or a list/tuple (nested values), is one chunk; any other iterable
    # (a generator, a DataLoader, a map) yields chunks.
    return (
        not hasattr(gates, "shape")
        and not hasattr(gates, "__array__")
        and not isinstance(gates, list | tuple)
        and isinstance(gates, Iterable)
    )


def _chunks(gates: Any, labels: Any = None) -> Iterator[tuple[Any, Any]]:
    """Pairs of (gates, labels) chunks from arrays or iterables of chunks, checked aligned."""
    label_chunks = iter(labels) if labels is not None and _chunked(labels) else None
    for chunk in gates:
        if labels is None:
            yield chunk, None
            continue
        if label_chunks is None:
            raise TypeError(
                "with gates given as an iterable of chunks, give labels as an iterable of "
                f"chunks too (one per gates chunk), got {type(labels).__qualname__}"
            )
        try:
            yield chunk, next(label_chunks)
        except StopIteration:
            raise ValueError(
                "labels ran out before gates: give one labels chunk per gates chunk"
            ) from None
    if label_chunks is not None and next(label_chunks, None) is not None:
        raise ValueError(
            "labels hold more chunks than gates: give one labels chunk per gates chunk"
        )


def _labelled(counts: np.ndarray | None) -> np.ndarray:
    if counts is None:  # labels=None with chunked gates
        raise ValueError("labels are required: give one labels chunk per gates chunk")
    return counts


def _accumulated(gates: Any, labels: Any = None, **options: Any) -> GateStatistics:
    statistics: GateStatistics | None = None
    for chunk, chunk_labels in _chunks(gates, labels):
        matrix = _matrix(chunk)
        if statistics is None:
            statistics = GateStatistics(matrix.shape[1], **options)
        statistics.update(matrix, labels=chunk_labels)
    if statistics is None:
        raise ValueError("gates yielded no chunk: there is nothing to count")
    return statistics


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
    gates : array, shape (S, N), or an iterable of them
        Gate coefficients (:func:`expert_coefficients` for several levels);
        an iterable that is not a list or tuple (a generator, a DataLoader)
        yields chunks of samples, counted as they come.
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
    if _chunked(gates):
        return _accumulated(gates, threshold=threshold).load
    matrix = _matrix(gates)
    return (matrix >= check_threshold(threshold)).sum(axis=0)


def class_histogram(
    gates: Any, labels: Any, *, n_classes: int | None = None, threshold: float = 0.5
) -> np.ndarray:
    r"""Per expert, the classes of the samples it processes.

    .. math::
        H_{nc} = \#\{s : y_s = c,\ a_{sn} \ge \tau\}

    Parameters
    ----------
    gates : array, shape (S, N), or an iterable of them
        As for :func:`expert_load`.
    labels : array of int, shape (S,), or an iterable of them
        The class of each sample; one chunk per chunk of ``gates``.
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
    if _chunked(gates):
        statistics = _accumulated(gates, labels, n_classes=n_classes, threshold=threshold)
        return _labelled(statistics.class_histogram)
    matrix = _matrix(gates)
    classes, n_classes = check_labels(labels, matrix.shape[0], n_classes)
    processed = (matrix >= check_threshold(threshold)).astype(np.int64)  # (S, N)
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
    gates : array, shape (S, N), or an iterable of them
        As for :func:`expert_load`.
    labels : array of int, shape (S,), or an iterable of them
        One chunk per chunk of ``gates``.
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
    if _chunked(gates):
        return _labelled(_accumulated(gates, labels, n_classes=n_classes).class_mass)
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
    gates : array, shape (S, N), or an iterable of them
        As for :func:`expert_load`; samples are numbered across the chunks.
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
    k = positive_int(k, "k")
    if _chunked(gates):
        statistics = _accumulated(gates, k=k)
        if k > statistics.rows:
            raise ValueError(f"k must be an int in [1, {statistics.rows}] (the samples), got {k!r}")
        return statistics.top_samples
    matrix = _matrix(gates)
    if k > matrix.shape[0]:
        raise ValueError(f"k must be an int in [1, {matrix.shape[0]}] (the samples), got {k!r}")
    order = np.argsort(-matrix, axis=0, kind="stable")[:k]
    return order.T.copy()
