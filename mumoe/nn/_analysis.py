r"""Analysis and editing of the experts of torch models: records, edits, counterfactuals.

:func:`collect_gates` records the coefficients of a model over a data set,
:func:`counterfactual_histogram` counts the predictions that change when
each expert is switched off, :func:`edit_experts` / :func:`edit_experts_`
switch experts off or rescale them, for a ``with`` block or for good, and
:func:`record_gates` records the coefficients of every gate of a model.  The
statistics of the coefficients they collect are :mod:`mumoe.analysis`'s.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from mumoe.backends import thread_backend
from mumoe.functional import scale_experts
from mumoe.nn._gate import MuMoEGate, dense_coefficients
from mumoe.nn._layers import MuMoE
from mumoe.validation import check_labels, host_array, positive_int

__all__ = [
    "GateRecord",
    "collect_gates",
    "counterfactual_histogram",
    "edit_experts",
    "edit_experts_",
    "record_gates",
]

Scales = Mapping[int, float] | Sequence[float] | np.ndarray


def _layers(model: torch.nn.Module) -> list[MuMoE]:
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
        vector = np.asarray(host_array(scales), dtype=np.float64)
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
    exact because :math:`\mathcal{W}` is linear in each expert mode; see
    :meth:`mumoe.nn.MuMoE.scaled_experts`, which this calls on each layer), so
    the stored weights are never touched and gradients still flow; the other
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
    >>> layer = CPMuMoE(8, 3, expert_dims=4, rank=2).eval()
    >>> x = torch.randn(5, 8)
    >>> with edit_experts(layer, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}):
    ...     layer(x).abs().max().item()  # every expert off
    0.0
    """
    layers, vector = _resolve(model, scales, level)
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.scaled_experts(level, vector))
        yield


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
    >>> layer = CPMuMoE(8, 3, expert_dims=4, rank=2)
    >>> edit_experts_(layer, {2: 0.0})
    >>> bool(torch.all(layer.cores[0][2] == 0))  # expert 2's row of the expert factor
    True
    """
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


def _evaluated(model: torch.nn.Module) -> torch.nn.Module:
    # The model in eval mode without changing its mode, which another thread may be
    # training with: a model in training mode is evaluated as a copy.
    if not any(module.training for module in model.modules()):
        return model
    return copy.deepcopy(model).eval()


def collect_gates(
    model: torch.nn.Module, inputs: torch.Tensor, *, gate: str | None = None, batch_size: int = 1024
) -> list[np.ndarray]:
    """The gate coefficients a torch model computes for every input, in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode without gradients.  Its mode is never changed (another
        thread may be training it): a model in training mode is evaluated as
        a copy, which costs the memory of one copy.
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
    >>> layer = CPMuMoE(8, 3, expert_dims=(4, 2), rank=2)
    >>> [a.shape for a in collect_gates(layer, torch.randn(5, 8))]
    [(5, 4), (5, 2)]
    """
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
    evaluated = _evaluated(model)
    with torch.no_grad(), record_gates(evaluated) as record:
        for batch in _batches(inputs, batch_size):
            evaluated(batch)
            chunks.append([host_array(a) for a in record[gate]])
    if not chunks:
        raise ValueError("inputs hold no samples")
    return [np.concatenate(level) for level in zip(*chunks, strict=True)]


def _predictions(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [host_array(model(batch).argmax(dim=-1)) for batch in _batches(inputs, batch_size)]
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
        run in eval mode without gradients (its mode unchanged, as for
        :func:`collect_gates`).
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
    >>> layer = CPMuMoE(8, 3, expert_dims=4, rank=2).eval()
    >>> counterfactual_histogram(layer, torch.randn(20, 8), np.zeros(20, dtype=int)).shape
    (4, 1)
    """
    layers, _ = _resolve(model, {}, level)
    n = layers[0].network.expert_dims[level]
    evaluated = _evaluated(model)
    with torch.no_grad():
        before = _predictions(evaluated, inputs, batch_size)
        classes, n_classes = check_labels(labels, before.shape[0], n_classes)
        histogram = np.zeros((n, n_classes), dtype=np.int64)
        for expert in range(n):
            with edit_experts(evaluated, {expert: 0.0}, level=level):
                changed = _predictions(evaluated, inputs, batch_size) != before
            histogram[expert] = np.bincount(classes[changed], minlength=n_classes)
    return histogram


class GateRecord(dict[str, list[torch.Tensor]]):
    """Detached gate coefficients of the last forward, by gate module name.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoEBlock
    >>> block = MuMoEBlock(8, 16, expert_dims=(4, 2), rank=3)
    >>> with record_gates(block) as record:
    ...     _ = block(torch.randn(5, 8))
    >>> {name: [tuple(a.shape) for a in gates] for name, gates in record.items()}
    {'gate': [(5, 4), (5, 2)]}
    """


@contextmanager
def record_gates(model: nn.Module) -> Iterator[GateRecord]:
    """Record, detached, the coefficients every gate of ``model`` computes.

    The record maps each :class:`MuMoEGate`'s qualified name (``"gate"``,
    ``"blocks.3.gate"``, ...) to the list of coefficients of its last call,
    each ``(..., N_e)``, made by the thread that opened the record (another
    thread's forward passes are not recorded).  Nothing is stored on the
    modules, and the hooks are removed on exit.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; every :class:`MuMoEGate` inside it is recorded.

    Yields
    ------
    GateRecord
        Filled by each forward pass inside the block.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(16, 10, "cp", expert_dims=8, rank=4)
    >>> with record_gates(layer) as gates:
    ...     _ = layer(torch.randn(3, 16))
    >>> [tuple(a.shape) for a in gates["gate"]], gates["gate"][0].requires_grad
    ([(3, 8)], False)
    """
    record = GateRecord()
    handles = []
    owner = threading.get_ident()  # another thread's forward passes are not recorded
    for name, module in model.named_modules():
        if isinstance(module, MuMoEGate):

            def hook(_: nn.Module, __: Any, output: list[torch.Tensor], name: str = name) -> None:
                if threading.get_ident() == owner:
                    record[name] = [a.detach() for a in dense_coefficients(output)]

            handles.append(module.register_forward_hook(hook))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
