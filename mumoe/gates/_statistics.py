"""Statistics of gate coefficients over a data set, accumulated chunk by chunk.

:class:`GateStatistics` folds each chunk of coefficients (with labels, a
padding mask and token windows) into per-expert sums, counts and top lists
whose size does not depend on the data; :mod:`mumoe.analysis` and
:func:`mumoe.nn.gate_statistics` use it over data sets too large to hold.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from mumoe.validation import check_labels, host_array, positive_int

__all__ = ["GateStatistics", "check_threshold"]


def check_threshold(threshold: float) -> float:
    """Check a coefficient threshold: a number in (0, 1].

    Parameters
    ----------
    threshold : float

    Returns
    -------
    float

    Examples
    --------
    >>> check_threshold(0.5)
    0.5
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold must be a number, got {threshold!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return float(threshold)


@numba.njit(cache=True, nogil=True)
def _add_class_sums(
    mass: np.ndarray, counts: np.ndarray, matrix: np.ndarray, classes: np.ndarray, threshold: float
) -> None:  # pragma: no cover (compiled)
    # Per class and expert (each class's sums one contiguous row): the rows' coefficients
    # and how many reach the threshold. One pass, whatever the number of classes.
    rows, n = matrix.shape
    for row in range(rows):
        c = classes[row]
        for e in range(n):
            v = matrix[row, e]
            mass[c, e] += v
            if v >= threshold:
                counts[c, e] += 1


@numba.njit(cache=True, nogil=True)
def _fold_top(
    matrix: np.ndarray,
    first: int,
    filled: int,
    values: np.ndarray,
    ids: np.ndarray,
    sources: np.ndarray,
) -> None:  # pragma: no cover (compiled)
    # One pass over the chunk's rows: each expert's list of its k largest coefficients is
    # kept sorted, largest first; a row enters a full list only above its k-th, and
    # after the equal values already in it (earlier rows win ties). sources[e, j] is the
    # slot an entry held before (< k) or k + its row in the chunk.
    rows, n = matrix.shape
    k = values.shape[1]
    for row in range(rows):
        count = min(filled + row, k)
        for e in range(n):
            v = matrix[row, e]
            if count == k and not v > values[e, k - 1]:
                continue
            j = count if count < k else k - 1
            while j > 0 and v > values[e, j - 1]:
                values[e, j] = values[e, j - 1]
                ids[e, j] = ids[e, j - 1]
                sources[e, j] = sources[e, j - 1]
                j -= 1
            values[e, j] = v
            ids[e, j] = first + row
            sources[e, j] = k + row


class GateStatistics:
    r"""The statistics of one gate level over a data set, accumulated chunk by chunk.

    Memory is the statistics' own, :math:`O(N (C + k W))`, whatever the
    number of samples: :meth:`update` folds each chunk in and keeps nothing of
    it.  The results equal :func:`mumoe.analysis.expert_load`,
    :func:`mumoe.analysis.class_histogram`, :func:`mumoe.analysis.class_mass`
    and :func:`mumoe.analysis.top_samples` on the concatenated chunks.

    Parameters
    ----------
    n_experts : int
        :math:`N`.
    n_classes : int, optional
        :math:`C`; by default one more than the largest label seen so far.
    threshold : float in (0, 1], default 0.5
        As for :func:`mumoe.analysis.expert_load`.
    k : int, default 8
        Rows kept per expert by :attr:`top_samples`.

    Attributes
    ----------
    rows : int
        Rows counted (padding left out).
    mass : numpy.ndarray, shape (N,)
        Each expert's summed coefficient; ``mass / rows`` is its mean share.
    load : numpy.ndarray of int, shape (N,)
        :func:`mumoe.analysis.expert_load`.
    top_samples : numpy.ndarray of int, shape (N, min(k, rows))
        The rows (numbered from 0 in the order counted) each expert weights
        most, largest first, ties in row order: :func:`mumoe.analysis.top_samples`.
    top_values : numpy.ndarray, shape (N, min(k, rows))
        Their coefficients.
    top_contexts : numpy.ndarray of int, shape (N, min(k, rows), W), or None
        The ``contexts`` given with those rows (a language model's token
        windows); None if none were given.

    Examples
    --------
    >>> import numpy as np
    >>> statistics = GateStatistics(2, k=1)
    >>> statistics.update(np.array([[0.9, 0.1], [0.4, 0.6]]), labels=np.array([0, 1]))
    >>> statistics.update(np.array([[0.2, 0.8]]), labels=np.array([1]))
    >>> statistics.rows, statistics.load, statistics.top_samples.ravel()
    (3, array([1, 2]), array([0, 2]))
    >>> statistics.class_mass
    array([[0.9, 0.6],
           [0.1, 1.4]])
    """

    def __init__(
        self,
        n_experts: int,
        *,
        n_classes: int | None = None,
        threshold: float = 0.5,
        k: int = 8,
    ) -> None:
        self.n_experts = positive_int(n_experts, "n_experts")
        self.n_classes = None if n_classes is None else positive_int(n_classes, "n_classes")
        self.threshold = check_threshold(threshold)
        self.k = positive_int(k, "k")
        self.rows = 0
        self.mass = np.zeros(self.n_experts)
        self.load = np.zeros(self.n_experts, dtype=np.int64)
        # Per class, then expert: a class's sums are one contiguous row.
        self._class_mass: np.ndarray | None = None
        self._class_histogram: np.ndarray | None = None
        self.top_values = np.zeros((self.n_experts, 0))
        self.top_samples = np.zeros((self.n_experts, 0), dtype=np.int64)
        self.top_contexts: np.ndarray | None = None
        self._labelled: bool | None = None

    def update(
        self, gates: Any, *, labels: Any = None, mask: Any = None, contexts: Any = None
    ) -> None:
        """Fold in a chunk of rows.

        Parameters
        ----------
        gates : array, shape (..., N)
            Coefficients; the leading dimensions (batch, tokens) are rows.
        labels : array of int, shape (...), optional
            Each row's class; given with every chunk or with none.
        mask : array of bool or 0/1 int, shape (...), optional
            True (1) for the rows to count (tokens), False (0) for padding.
        contexts : array of int, shape (..., W), optional
            What to keep beside each top row (its token window); given with
            every chunk or with none, of one width.

        Raises
        ------
        ValueError
            For shapes that disagree with ``gates``' or with earlier chunks, a
            label of ``n_classes`` or more, labels or contexts given with
            some chunks only, a mask that is not bool or 0/1, or non-finite
            coefficients; the statistics are then left as they were.
        TypeError
            For labels that are not integers.

        Examples
        --------
        >>> import numpy as np
        >>> statistics = GateStatistics(2)
        >>> tokens = np.array([[[0.9, 0.1], [0.5, 0.5]]])  # (batch 1, 2 tokens, N)
        >>> statistics.update(tokens, mask=np.array([[True, False]]))
        >>> statistics.rows, statistics.mass
        (1, array([0.9, 0.1]))
        """
        array = host_array(gates)
        if array.ndim == 0 or array.shape[-1] != self.n_experts:
            raise ValueError(
                f"gates must have shape (..., {self.n_experts}) (one coefficient per expert), "
                f"got {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"gates must be floating point, got {array.dtype}")
        lead = array.shape[:-1]
        matrix = array.reshape(-1, self.n_experts)
        if matrix.dtype not in (np.float32, np.float64):  # float16: widened, exactly
            matrix = matrix.astype(np.float32)
        keep = None
        if mask is not None:
            keep = host_array(mask)
            integer = np.issubdtype(keep.dtype, np.integer)
            if keep.shape != lead or not (keep.dtype == np.bool_ or integer):
                raise ValueError(
                    f"mask must be a bool or integer array of shape {lead} (the gates' rows), "
                    f"got {keep.dtype} {keep.shape}"
                )
            if integer and np.any((keep != 0) & (keep != 1)):
                raise ValueError("an integer mask must hold 0 (padding) and 1 (a row) only")
            keep = keep.reshape(-1) != 0
            matrix = matrix[keep]
        if not np.all(np.isfinite(matrix)):
            raise ValueError(
                "gates hold non-finite coefficients (NaN or inf: the model gave them for "
                "some input); leave those rows out with mask="
            )
        # Every check before any change: a chunk that fails leaves the statistics as they were.
        if (labels is not None) != self._labelled and self._labelled is not None:
            raise ValueError("labels must come with every chunk or with none")
        classes, n_classes = None, 0
        if labels is not None:
            label_array = host_array(labels)
            if label_array.shape != lead:
                raise ValueError(
                    f"labels must have shape {lead} (the gates' rows), got {label_array.shape}"
                )
            label_array = label_array.reshape(-1)
            classes, n_classes = check_labels(
                label_array if keep is None else label_array[keep], matrix.shape[0], self.n_classes
            )
        context_rows = None
        if contexts is not None:
            context_array = host_array(contexts)
            if context_array.ndim != len(lead) + 1 or context_array.shape[:-1] != lead:
                raise ValueError(
                    f"contexts must have shape {(*lead, 'W')}, got {context_array.shape}"
                )
            context_rows = context_array.reshape(-1, context_array.shape[-1])
            if keep is not None:
                context_rows = context_rows[keep]
            width = None if self.top_contexts is None else self.top_contexts.shape[-1]
            if width is not None and context_rows.shape[-1] != width:
                raise ValueError(
                    f"contexts must be {width} wide, as before; got {context_rows.shape[-1]}"
                )
        if (context_rows is None) != (self.top_contexts is None) and self.top_samples.shape[1]:
            raise ValueError("contexts must come with every chunk or with none")
        self._labelled = labels is not None
        if classes is not None:
            self._grow_classes(n_classes)
        if not matrix.shape[0]:
            return
        self.mass += matrix.sum(axis=0, dtype=np.float64)
        self.load += (matrix >= self.threshold).sum(axis=0)
        if (
            classes is not None
            and self._class_mass is not None
            and self._class_histogram is not None
        ):
            _add_class_sums(
                self._class_mass,
                self._class_histogram,
                np.ascontiguousarray(matrix),
                classes.astype(np.int64),
                self.threshold,
            )
        self._merge_top(matrix, context_rows)
        self.rows += matrix.shape[0]

    @property
    def class_mass(self) -> np.ndarray | None:
        """:func:`mumoe.analysis.class_mass` of the rows so far, (N, C); None without labels.

        Examples
        --------
        >>> statistics = GateStatistics(2)
        >>> statistics.update(np.array([[0.75, 0.25]]), labels=np.array([1]))
        >>> statistics.class_mass
        array([[0.  , 0.75],
               [0.  , 0.25]])
        """
        return None if self._class_mass is None else self._class_mass.T

    @property
    def class_histogram(self) -> np.ndarray | None:
        """:func:`mumoe.analysis.class_histogram` of the rows so far, (N, C); None without labels.

        Examples
        --------
        >>> statistics = GateStatistics(2)
        >>> statistics.update(np.array([[0.75, 0.25]]), labels=np.array([1]))
        >>> statistics.class_histogram
        array([[0, 1],
               [0, 0]])
        """
        return None if self._class_histogram is None else self._class_histogram.T

    def _grow_classes(self, n_classes: int) -> None:
        if self._class_mass is None or self._class_histogram is None:
            self._class_mass = np.zeros((n_classes, self.n_experts))
            self._class_histogram = np.zeros((n_classes, self.n_experts), dtype=np.int64)
        elif n_classes > self._class_mass.shape[0]:  # a larger label than any before
            grow = ((0, n_classes - self._class_mass.shape[0]), (0, 0))
            self._class_mass = np.pad(self._class_mass, grow)
            self._class_histogram = np.pad(self._class_histogram, grow)

    def _merge_top(self, matrix: np.ndarray, contexts: np.ndarray | None) -> None:
        k, filled = self.k, self.top_values.shape[1]
        values = np.zeros((self.n_experts, k))
        ids = np.zeros((self.n_experts, k), dtype=np.int64)
        values[:, :filled], ids[:, :filled] = self.top_values, self.top_samples
        sources = np.broadcast_to(np.arange(k), (self.n_experts, k)).copy()
        _fold_top(np.ascontiguousarray(matrix), self.rows, filled, values, ids, sources)
        width = min(k, filled + matrix.shape[0])
        self.top_values, self.top_samples = values[:, :width], ids[:, :width]
        if contexts is not None:
            sources = sources[:, :width]
            new = contexts[np.clip(sources - k, 0, None)]  # (N, width, W)
            if filled and self.top_contexts is not None:
                slots = np.clip(sources, 0, filled - 1)[:, :, None]
                kept = np.take_along_axis(self.top_contexts, slots, axis=1)
                new = np.where((sources < k)[:, :, None], kept, new)
            self.top_contexts = new
