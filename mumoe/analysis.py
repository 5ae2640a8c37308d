r"""Inspect and edit the experts of a trained μMoE model.

Index legend: ``S`` samples, ``N`` experts (``N_1 \cdots N_E`` joint experts
with several levels, in C order), ``C`` classes, ``k`` samples per expert.

The statistics (:func:`expert_load`, :func:`class_histogram`,
:func:`polysemanticity`, :func:`top_samples`) work on plain arrays of gate
coefficients, host (NumPy) arrays or anything NumPy can read, such as CPU
torch tensors; they need no torch.  :func:`collect_gates` records the
coefficients of a torch model over a data set, :func:`counterfactual_histogram`
counts the predictions that change when each expert is switched off, and
:func:`edit_experts` / :func:`edit_experts_` switch experts off or rescale them,
for a ``with`` block or for good.

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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from mumoe.network import positive_int

if TYPE_CHECKING:  # torch is optional: only the model-facing functions need it
    import torch

__all__ = [
    "class_histogram",
    "class_mass",
    "collect_gates",
    "counterfactual_histogram",
    "edit_experts",
    "edit_experts_",
    "expert_coefficients",
    "expert_load",
    "mean_polysemanticity",
    "polysemanticity",
    "top_samples",
]

Scales = Mapping[int, float] | Sequence[float] | np.ndarray


def _host(array: Any) -> np.ndarray:
    """A NumPy view or copy of a NumPy, torch (any device) or CuPy array."""
    if hasattr(array, "detach"):  # torch
        array = array.detach().cpu()
    elif type(array).__module__.startswith("cupy"):
        array = array.get()
    return np.asarray(array)


def _matrix(coefficients: Any, name: str = "coefficients") -> np.ndarray:
    matrix = _host(coefficients)
    if matrix.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (samples, experts); got shape {matrix.shape} "
            "(use expert_coefficients to join several levels)"
        )
    if not np.issubdtype(matrix.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got {matrix.dtype}")
    return matrix


def _labels(labels: Any, n_samples: int, n_classes: int | None) -> tuple[np.ndarray, int]:
    array = _host(labels)
    if array.shape != (n_samples,):
        raise ValueError(
            f"labels must have shape ({n_samples},) (one per sample), got {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"labels must be integers (class indices), got {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {array.min()}")
    seen = int(array.max()) + 1 if array.size else 0
    if n_classes is None:
        n_classes = seen
    elif seen > n_classes:
        raise ValueError(f"labels hold class {seen - 1} but n_classes is {n_classes}")
    return array, n_classes


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
    arrays = [_host(a) for a in levels]
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


def expert_load(coefficients: Any, threshold: float = 0.5) -> np.ndarray:
    r"""How many samples each expert processes: coefficient :math:`\ge` ``threshold``.

    Parameters
    ----------
    coefficients : array, shape (S, N)
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
    matrix = _matrix(coefficients)
    return (matrix >= _threshold(threshold)).sum(axis=0)


def class_histogram(
    coefficients: Any, labels: Any, *, n_classes: int | None = None, threshold: float = 0.5
) -> np.ndarray:
    r"""Per expert, the classes of the samples it processes.

    .. math::
        H_{nc} = \#\{s : y_s = c,\ a_{sn} \ge \tau\}

    Parameters
    ----------
    coefficients : array, shape (S, N)
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
    matrix = _matrix(coefficients)
    classes, n_classes = _labels(labels, matrix.shape[0], n_classes)
    processed = (matrix >= _threshold(threshold)).astype(np.int64)  # (S, N)
    onehot = np.eye(n_classes, dtype=np.int64)[classes]  # (S, C)
    return processed.T @ onehot


def class_mass(coefficients: Any, labels: Any, *, n_classes: int | None = None) -> np.ndarray:
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
    coefficients : array, shape (S, N)
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
    matrix = _matrix(coefficients)
    classes, n_classes = _labels(labels, matrix.shape[0], n_classes)
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
    counts = _host(histogram)
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


def top_samples(coefficients: Any, k: int = 8) -> np.ndarray:
    """The samples each expert weights most, largest coefficient first.

    Parameters
    ----------
    coefficients : array, shape (S, N)
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
    matrix = _matrix(coefficients)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= matrix.shape[0]:
        raise ValueError(f"k must be an int in [1, {matrix.shape[0]}] (the samples), got {k!r}")
    order = np.argsort(-matrix, axis=0, kind="stable")[:k]
    return order.T.copy()


# --- torch models ---------------------------------------------------------------


def _layers(model: torch.nn.Module) -> list[Any]:
    from mumoe.nn import MuMoE

    layers = [m for m in model.modules() if isinstance(m, MuMoE)]
    if not layers:
        raise TypeError(f"{type(model).__qualname__} holds no mumoe.nn.MuMoE layer to edit")
    return layers


def _scale_vector(scales: Scales, n: int, level: int) -> np.ndarray:
    if isinstance(scales, Mapping):
        vector = np.ones(n)
        for index, factor in scales.items():
            if isinstance(index, bool) or not isinstance(index, int | np.integer):
                raise TypeError(f"expert indices must be ints, got {index!r}")
            if not -n <= index < n:
                raise ValueError(f"expert {index} is out of range for level {level} of size {n}")
            vector[index] = factor
    else:
        vector = np.asarray(_host(scales), dtype=np.float64)
        if vector.shape != (n,):
            raise ValueError(
                f"scales for level {level} must have shape ({n},) or be a "
                f"{{expert: factor}} mapping, got shape {vector.shape}"
            )
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"scales must be finite, got {vector.tolist()}")
    return vector


def _resolve(model: torch.nn.Module, scales: Scales, level: int) -> tuple[list[Any], np.ndarray]:
    layers = _layers(model)
    for layer in layers:
        if not 0 <= level < layer.network.n_levels:
            raise ValueError(
                f"level must be in [0, {layer.network.n_levels}) for a layer with "
                f"expert_dims {layer.network.expert_dims}, got {level}"
            )
    sizes = {layer.network.expert_dims[level] for layer in layers}
    if len(sizes) != 1:
        raise ValueError(
            f"the model's μMoE layers have {sorted(sizes)} experts at level {level}; "
            "edit one layer (or block) at a time"
        )
    return layers, _scale_vector(scales, sizes.pop(), level)


@contextmanager
def edit_experts(model: torch.nn.Module, scales: Scales, *, level: int = 0) -> Iterator[None]:
    r"""Switch experts off or rescale them inside a ``with`` block.

    Every :class:`mumoe.nn.MuMoE` in ``model`` (the model itself, both
    layers of a :class:`~mumoe.nn.MuMoEBlock`, ...) computes, inside the
    block, with :math:`\mathcal{W}[\dots, n_e, \dots]` multiplied by
    ``scales[n_e]``.  It is done on the coefficients (``a_e[n] * s[n]``,
    exact because :math:`\mathcal{W}` is linear in each expert mode), so the
    stored weights are never touched and gradients still flow; the other
    coefficients are not renormalised.  Gates returned by ``return_gates``
    or recorded by :func:`mumoe.nn.record_gates` stay the unedited routing.
    Edits nest: factors multiply, and each block restores what it found.

    Parameters
    ----------
    model : torch.nn.Module
        Holds at least one μMoE layer; all of them are edited, so their
        level ``level`` must have the same number of experts.
    scales : mapping {expert: factor} or array-like of shape (N_e,)
        0 switches an expert off; experts not in a mapping keep factor 1.
    level : int, default 0
        The expert level (0-based).

    Raises
    ------
    TypeError
        If ``model`` holds no μMoE layer.
    ValueError
        If ``level`` or an expert index is out of range, or the scales have
        the wrong shape or a non-finite value.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import CPMuMoE
    >>> layer = CPMuMoE(8, 3, 4, rank=2).eval()
    >>> x = torch.randn(5, 8)
    >>> with edit_experts(layer, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}):
    ...     layer(x).abs().max().item()  # every expert off
    0.0
    """
    layers, vector = _resolve(model, scales, level)
    saved = [layer.expert_scales for layer in layers]
    try:
        for layer, previous in zip(layers, saved, strict=True):
            factor = _as_tensor(vector, layer)
            if level in previous:
                factor = previous[level] * factor
            layer.expert_scales = {**previous, level: factor}
        yield
    finally:
        for layer, previous in zip(layers, saved, strict=True):
            layer.expert_scales = previous


def _as_tensor(vector: np.ndarray, layer: Any) -> torch.Tensor:
    import torch

    weight = next(iter(layer.parameters()), None)
    device = weight.device if weight is not None else None
    return torch.as_tensor(vector, dtype=torch.float64, device=device)


def edit_experts_(model: torch.nn.Module, scales: Scales, *, level: int = 0) -> None:
    """Rescale experts for good: multiply the stored cores (in place, no gradient).

    The permanent form of :func:`edit_experts`, done with
    :func:`mumoe.scale_experts`: the core that holds the expert leg is
    multiplied along it, so the model gives the same outputs as inside
    ``edit_experts(model, scales, level=level)``, with no per-call cost.

    Parameters
    ----------
    model, scales, level
        As for :func:`edit_experts`.

    Raises
    ------
    TypeError
        If a layer does not own its cores (a
        :class:`~mumoe.nn.FactorizedMuMoE` takes them from its tensorly-torch
        tensor): edit that tensor's factors instead.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import CPMuMoE
    >>> layer = CPMuMoE(8, 3, 4, rank=2)
    >>> edit_experts_(layer, {2: 0.0})
    >>> bool(torch.all(layer.cores[0][2] == 0))  # expert 2's row of the expert factor
    True
    """
    import torch

    from mumoe.backend import thread_backend
    from mumoe.functional import scale_experts

    layers, vector = _resolve(model, scales, level)
    for layer in layers:
        if not layer._owns_cores:
            raise TypeError(
                f"{type(layer).__qualname__} does not own its cores; edit_experts_ needs a "
                "MuMoE whose cores are its parameters (use edit_experts, or edit the "
                "factorized tensor)"
            )
    with torch.no_grad(), thread_backend("pytorch"):
        for layer in layers:
            network, cores = layer._weights()
            scaled = scale_experts(network, [c.detach() for c in cores], level, vector)
            for core, new in zip(cores, scaled, strict=True):
                if new is not core:
                    core.copy_(new)


def _batches(inputs: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    batch_size = positive_int(batch_size, "batch_size")
    for start in range(0, inputs.shape[0], batch_size):
        yield inputs[start : start + batch_size]


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    import torch

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def collect_gates(
    model: torch.nn.Module, inputs: torch.Tensor, *, gate: str | None = None, batch_size: int = 1024
) -> list[np.ndarray]:
    """The gate coefficients a torch model computes for every input, in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode without gradients; its training flag is restored.
    inputs : torch.Tensor, shape (S, ...)
        What ``model`` takes, batched along the first dimension.
    gate : str, optional
        The qualified name of the :class:`~mumoe.nn.MuMoEGate` to record
        (``"gate"``, ``"blocks.3.gate"``); required when the model has more
        than one.
    batch_size : int, default 1024

    Returns
    -------
    list of numpy.ndarray, each (S, ..., N_e)
        One array per expert level.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import CPMuMoE
    >>> [a.shape for a in collect_gates(CPMuMoE(8, 3, (4, 2), rank=2), torch.randn(5, 8))]
    [(5, 4), (5, 2)]
    """
    import torch

    from mumoe.nn import MuMoEGate, record_gates

    names = [name for name, m in model.named_modules() if isinstance(m, MuMoEGate)]
    if not names:
        raise TypeError(f"{type(model).__qualname__} holds no MuMoEGate to record")
    if gate is None:
        if len(names) > 1:
            raise ValueError(f"the model has several gates {names}: choose one with gate=")
        gate = names[0]
    elif gate not in names:
        raise ValueError(f"no gate named {gate!r}; the model's gates are {names}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        raise TypeError(f"inputs must be a batched torch.Tensor, got {type(inputs).__qualname__}")
    chunks: list[list[np.ndarray]] = []
    with _evaluating(model), record_gates(model) as record:
        for batch in _batches(inputs, batch_size):
            model(batch)
            chunks.append([_host(a) for a in record[gate]])
    if not chunks:
        raise ValueError("inputs hold no samples")
    return [np.concatenate(level) for level in zip(*chunks, strict=True)]


def _predictions(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [_host(model(batch).argmax(dim=-1)) for batch in _batches(inputs, batch_size)]
    )


def counterfactual_histogram(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: Any,
    *,
    level: int = 0,
    n_classes: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    r"""Per expert, the classes whose predictions change when it is switched off.

    For each expert :math:`n` of ``level``, the model is run with that expert
    switched off (:func:`edit_experts` with factor 0) and compared with the
    unedited model:

    .. math::
        H_{nc} = \#\{s : y_s = c,\ \hat y_s^{(-n)} \ne \hat y_s\}

    where :math:`\hat y` is the argmax of the model's output.  Unlike
    :func:`class_histogram`, which counts what the gate routes to an expert,
    this counts what the expert is *responsible for*; it costs one pass over
    ``inputs`` per expert.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier whose output's last dimension holds the class scores;
        run in eval mode without gradients.
    inputs : torch.Tensor, shape (S, ...)
    labels : array of int, shape (S,)
        The class to count each changed sample under (true labels, or the
        unedited predictions).
    level : int, default 0
    n_classes : int, optional
    batch_size : int, default 1024

    Returns
    -------
    numpy.ndarray of int, shape (N_level, C)

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from mumoe.nn import CPMuMoE
    >>> torch.manual_seed(0) and None
    >>> layer = CPMuMoE(8, 3, 4, rank=2).eval()
    >>> counterfactual_histogram(layer, torch.randn(20, 8), np.zeros(20, dtype=int)).shape
    (4, 1)
    """
    layers, _ = _resolve(model, {}, level)
    n = layers[0].network.expert_dims[level]
    with _evaluating(model):
        before = _predictions(model, inputs, batch_size)
        classes, n_classes = _labels(labels, before.shape[0], n_classes)
        histogram = np.zeros((n, n_classes), dtype=np.int64)
        for expert in range(n):
            with edit_experts(model, {expert: 0.0}, level=level):
                changed = _predictions(model, inputs, batch_size) != before
            histogram[expert] = np.bincount(classes[changed], minlength=n_classes)
    return histogram
