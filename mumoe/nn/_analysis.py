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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from mumoe.backends import thread_backend
from mumoe.functional import scale_experts
from mumoe.gates import GateStatistics
from mumoe.nn._batches import (
    Field,
    LabelSource,
    batches,
    call,
    field,
    inputs_dropped,
    logits_of,
    samples_of,
)
from mumoe.nn._gate import MuMoEGate, dense_coefficients
from mumoe.nn._layers import MuMoE
from mumoe.validation import check_labels, host_array

__all__ = [
    "GateRecord",
    "collect_gates",
    "counterfactual_histogram",
    "edit_experts",
    "edit_experts_",
    "gate_names",
    "gate_statistics",
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
        if layer._modules.get("bond_regularizer") is not None:
            raise ValueError(
                "edit_experts_ scales the stored cores, which a bond regularizer normalises: "
                "fold it in first (prune_bonds), or use edit_experts"
            )
    with torch.no_grad(), thread_backend("pytorch"):
        for layer in layers:
            network, cores = layer._weights()
            scaled = scale_experts(network, [c.detach() for c in cores], level, vector)
            for core, new in zip(cores, scaled, strict=True):
                if new is not core:
                    core.copy_(new)


def _evaluated(model: torch.nn.Module) -> torch.nn.Module:
    # The model in eval mode without changing its mode, which another thread may be
    # training with: a model in training mode is evaluated as a copy.
    if not any(module.training for module in model.modules()):
        return model
    return copy.deepcopy(model).eval()


def gate_names(model: nn.Module, gates: str | Sequence[str] | None) -> list[str]:
    """The qualified names of the chosen gates: each named itself or by its layer or block.

    Parameters
    ----------
    model : torch.nn.Module
    gates : str or sequence of str, optional
        Names of gates, or of the layers or blocks holding them; None: all.

    Returns
    -------
    list of str

    Raises
    ------
    TypeError
        If ``model`` holds no gate.
    ValueError
        If a name is neither (the message lists the model's gates).

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoEBlock
    >>> model = torch.nn.ModuleDict({"mlp": MuMoEBlock(4, 8, expert_dims=2, rank=2)})
    >>> gate_names(model, "mlp")
    ['mlp.gate']
    """
    every = [name for name, m in model.named_modules() if isinstance(m, MuMoEGate)]
    if not every:
        raise TypeError(f"{type(model).__qualname__} holds no MuMoEGate to watch")
    if gates is None:
        return every
    chosen = []
    for name in [gates] if isinstance(gates, str) else list(gates):
        gate = name if name in every else f"{name}.gate" if name else "gate"
        if gate not in every:
            raise ValueError(
                f"{name!r} is neither a gate of the model nor a layer or block holding one; "
                f"its gates are {every}"
            )
        if gate not in chosen:  # a gate named twice (or by itself and its layer) counts once
            chosen.append(gate)
    if not chosen:
        raise ValueError("gates= names no gate; give at least one name, or None for all")
    return chosen


@contextmanager
def _gate_calls(
    model: nn.Module, names: list[str]
) -> Iterator[dict[str, list[list[torch.Tensor]]]]:
    """Every call of the named gates, each a list of detached dense levels, by gate name.

    Unlike :func:`record_gates`, which keeps a gate's last call, a gate that runs several
    times in one forward pass (a layer applied twice, shared across depth) has each call.
    """
    calls: dict[str, list[list[torch.Tensor]]] = {name: [] for name in names}
    with _watching(model, names, lambda name, levels: calls[name].append(levels)):
        yield calls


@contextmanager
def _watching(
    model: nn.Module, names: list[str], store: Callable[[str, list[torch.Tensor]], None]
) -> Iterator[None]:
    """Hand ``store(name, levels)`` each call's detached dense coefficients of the named gates.

    Only the calls of the thread that opened the block (another thread's passes are not
    this block's); the hooks are removed on exit.
    """
    owner = threading.get_ident()

    def hook_of(name: str) -> Any:
        def hook(_: nn.Module, __: Any, output: list[Any]) -> None:
            if threading.get_ident() == owner:
                store(name, [a.detach() for a in dense_coefficients(output)])

        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_of(name)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_batch(
    model: nn.Module, batch: Any, drop: set[str], calls: dict[str, list[list[torch.Tensor]]]
) -> None:
    for recorded in calls.values():
        recorded.clear()
    call(model, batch, drop)
    missing = [name for name, recorded in calls.items() if not recorded]
    if missing:
        raise ValueError(f"the gates {missing} did not run on a batch of data")


def _rows_of(gates: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(gates[0].shape[:-1])


def _row_values(values: Any, lead: tuple[int, ...], what: str) -> np.ndarray:
    # One value per row (token), or one per sample given for each of its tokens.
    array = host_array(values)
    if array.shape == lead:
        return array
    if len(lead) > 1 and array.shape == lead[:1]:
        return np.broadcast_to(array.reshape(-1, *([1] * (len(lead) - 1))), lead)
    raise ValueError(
        f"{what} must have the gates' leading shape {lead} (one per row) or {lead[:1]} (one "
        f"per sample), got {array.shape}"
    )


def _windows(tokens: Any, lead: tuple[int, ...], window: tuple[int, int]) -> np.ndarray:
    """Each position's token window ``tokens[b, t - before : t + after + 1]``, -1 outside."""
    ids = host_array(tokens)
    if ids.shape != lead or len(lead) != 2:
        raise ValueError(
            f"tokens must be (batch, positions) ids of the gates' leading shape {lead}, got "
            f"{ids.shape}"
        )
    before, after = window
    padded = np.pad(ids.astype(np.int64), ((0, 0), (before, after)), constant_values=-1)
    offsets = np.arange(before + after + 1)
    return padded[:, np.arange(lead[1])[:, None] + offsets]  # (B, T, W)


def _check_window(window: Any) -> tuple[int, int]:
    if (
        not isinstance(window, tuple)
        or len(window) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in window)
    ):
        raise ValueError(
            f"window must be (tokens before, tokens after), two ints >= 0, got {window!r}"
        )
    return window


def gate_statistics(
    model: nn.Module,
    data: Any,
    *,
    gates: str | Sequence[str] | None = None,
    labels: Any = None,
    mask: Field | None = None,
    tokens: Field | None = None,
    window: tuple[int, int] = (8, 2),
    ignore_index: int | None = -100,
    n_classes: int | None = None,
    threshold: float = 0.5,
    k: int = 8,
    batch_size: int = 1024,
) -> dict[str, list[GateStatistics]]:
    """The statistics of a model's gates over a data set, in memory that does not grow with it.

    The model runs on each batch in eval mode without gradients (its mode
    unchanged, as for :func:`collect_gates`); each watched gate's
    coefficients are folded into a :class:`mumoe.gates.GateStatistics` per
    level and dropped, so the data set may be as large as a DataLoader can
    stream (ImageNet's validation set, a corpus' tokens).

    Parameters
    ----------
    model : torch.nn.Module
    data : torch.Tensor, mapping of tensors, or iterable of batches
        A tensor or mapping is sliced into ``batch_size`` rows; any other
        iterable (a ``DataLoader``) yields batches: tensors, ``(inputs,
        labels)`` tuples (the model gets the first item) or mappings of the
        model's keyword arguments (``input_ids``, ``attention_mask``; a
        ``"labels"`` key is not passed).  A gate that runs several times in a
        forward pass (a layer shared across depth) counts each call's rows.
    gates : str or sequence of str, optional
        The gates to watch, by the qualified name of the gate or of the layer
        or block holding it; all of the model's by default.
    labels : str, int, array or iterable, optional
        Each sample's (or token's) class: a mapping key (``"labels"``; not
        passed to the model, unless it is ``tokens`` or ``mask`` too, so that
        ``"input_ids"`` labels each token by itself) or a tuple position of
        the batch, an array of one label per sample beside the data, or an
        iterable of per-batch arrays.  A label per sample counts for each of
        its tokens.
    mask : str or int, optional
        The batch item holding a padding mask (``"attention_mask"``): rows
        where it is 0 are left out of every statistic.
    tokens : str or int, optional
        The batch item holding a language model's token ids ``(B, T)``: each
        expert's top rows then keep their token windows
        (``GateStatistics.top_contexts``).
    window : (int, int), default (8, 2)
        Tokens before and after each top token kept with ``tokens``.
    ignore_index : int or None, default -100
        Rows labelled so are left out, as padding (``transformers``' and
        ``torch.nn.CrossEntropyLoss``'s label for tokens not to count).
    n_classes, threshold, k
        As for :class:`mumoe.gates.GateStatistics`.
    batch_size : int, default 1024
        For data given as a tensor or mapping.

    Returns
    -------
    dict of str to list of GateStatistics
        Per watched gate, one per level.

    Raises
    ------
    ValueError
        For data that yields nothing, a gate name that does not exist (the
        message lists the model's gates), labels or a mask of the wrong shape,
        labels that run out or are left over.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import CPMuMoE
    >>> layer = CPMuMoE(8, 3, expert_dims=4, rank=2).eval()
    >>> data = torch.utils.data.DataLoader(
    ...     torch.utils.data.TensorDataset(torch.randn(50, 8), torch.randint(0, 3, (50,))),
    ...     batch_size=16)
    >>> statistics = gate_statistics(layer, data, labels=1)["gate"][0]
    >>> statistics.rows, statistics.class_mass.shape, statistics.top_samples.shape
    (50, (4, 3), (4, 8))
    """
    names = gate_names(model, gates)
    window = _check_window(window)
    source = None if labels is None else LabelSource(labels)
    drop = inputs_dropped(labels, tokens, mask)
    statistics: dict[str, list[GateStatistics]] = {}
    evaluated = _evaluated(model)
    seen = 0
    with torch.no_grad(), _gate_calls(evaluated, names) as calls:
        for batch in batches(data, batch_size):
            seen += 1
            _run_batch(evaluated, batch, drop, calls)
            batch_labels = None if source is None else source.next(batch, samples_of(batch))
            for name in names:
                for levels in calls[name]:  # each call of the gate in this forward pass
                    lead = _rows_of(levels)
                    keep = None
                    if mask is not None:
                        keep = _row_values(field(batch, mask, "mask"), lead, "mask") != 0
                    row_labels = None
                    if batch_labels is not None:
                        row_labels = _row_values(batch_labels, lead, "labels")
                        if ignore_index is not None:
                            ignored = row_labels == ignore_index
                            keep = ~ignored if keep is None else keep & ~ignored
                    contexts = None
                    if tokens is not None:
                        contexts = _windows(field(batch, tokens, "tokens"), lead, window)
                    if name not in statistics:
                        statistics[name] = [
                            GateStatistics(
                                a.shape[-1], n_classes=n_classes, threshold=threshold, k=k
                            )
                            for a in levels
                        ]
                    for level, a in zip(statistics[name], levels, strict=True):
                        level.update(host_array(a), labels=row_labels, mask=keep, contexts=contexts)
    if not seen:
        raise ValueError("data yielded no batches: there is nothing to count")
    if source is not None:
        source.finish()
    return statistics


def collect_gates(
    model: torch.nn.Module,
    data: Any,
    *,
    gate: str | None = None,
    mask: Field | None = None,
    batch_size: int = 1024,
) -> list[np.ndarray]:
    """The gate coefficients a torch model computes for every input, in eval mode.

    The result holds every row's coefficients, so it grows with the data; for
    statistics over a large data set, :func:`gate_statistics` keeps memory flat.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode without gradients.  Its mode is never changed (another
        thread may be training it): a model in training mode is evaluated as
        a copy, which costs the memory of one copy.
    data : torch.Tensor, shape (S, ...), mapping of tensors, or iterable of batches
        As for :func:`gate_statistics`; a gate called several times in a
        forward pass gives each call's rows, one after the other.
    gate : str, optional
        The qualified name of the :class:`~mumoe.nn.MuMoEGate` to record, or of
        the layer or block holding it (``"gate"``, ``"blocks.3.mlp"``);
        required when the model has more than one.
    mask : str or int, optional
        The batch item holding a padding mask: the result is then the
        unpadded rows, each array ``(R, N_e)``.
    batch_size : int, default 1024
        For data given as a tensor or mapping.

    Returns
    -------
    list of numpy.ndarray, each (S, ..., N_e)
        One array per expert level, batches joined along the first dimension.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import CPMuMoE
    >>> layer = CPMuMoE(8, 3, expert_dims=(4, 2), rank=2)
    >>> [a.shape for a in collect_gates(layer, torch.randn(5, 8))]
    [(5, 4), (5, 2)]
    """
    every = gate_names(model, None)
    if gate is None and len(every) > 1:
        raise ValueError(f"the model has several gates {every}: choose one with gate=")
    (name,) = gate_names(model, gate) if gate is not None else every
    chunks: list[list[np.ndarray]] = []
    evaluated = _evaluated(model)
    with torch.no_grad(), _gate_calls(evaluated, [name]) as calls:
        for batch in batches(data, batch_size):
            _run_batch(evaluated, batch, inputs_dropped(None, mask), calls)
            for recorded in calls[name]:  # each call of the gate in this forward pass
                levels = [host_array(a) for a in recorded]
                if mask is not None:
                    lead = levels[0].shape[:-1]
                    keep = _row_values(field(batch, mask, "mask"), lead, "mask") != 0
                    levels = [a[keep] for a in levels]
                chunks.append(levels)
    if not chunks:
        raise ValueError("data yielded no batches: there is nothing to record")
    return [np.concatenate(level) for level in zip(*chunks, strict=True)]


def _predictions(model: torch.nn.Module, batch: Any, drop: set[Any]) -> np.ndarray:
    return host_array(logits_of(call(model, batch, drop)).argmax(dim=-1))


def counterfactual_histogram(
    model: torch.nn.Module,
    data: Any,
    labels: Any,
    *,
    level: int = 0,
    layer: str | None = None,
    mask: Field | None = None,
    ignore_index: int | None = -100,
    n_classes: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    r"""Per expert, the classes whose predictions change when it is switched off.

    For each expert :math:`n` of ``level``, the model is run with that expert
    switched off (:func:`edit_experts` with factor 0) and compared with the
    unedited model:

    .. math::
        H_{nc} = \#\{s : y_s = c,\ \hat y_s^{(-n)} \ne \hat y_s\}

    where :math:`\hat y` is the argmax of the model's output (per sample, or
    per token of a language model).  Unlike :func:`class_histogram`, which
    counts what the gate routes to an expert, this counts what the expert is
    *responsible for*.  It makes one pass over ``data`` (so a generator will
    do), running each batch once unedited and once per expert; memory is the
    histogram's.

    Parameters
    ----------
    model : torch.nn.Module
        Whose output's last dimension holds the class scores (or an output
        with ``.logits``); run in eval mode without gradients (its mode
        unchanged, as for :func:`collect_gates`).
    data : torch.Tensor, mapping of tensors, or iterable of batches
        As for :func:`gate_statistics`.
    labels : str, int, array or iterable
        The class to count each changed prediction under (true labels, or the
        unedited predictions), as for :func:`gate_statistics`: of the
        predictions' shape, or one per sample for each of its tokens.
    level : int, default 0
    layer : str, optional
        The qualified name of the layer or block whose experts are switched
        off; every μMoE layer of the model by default (all must then have
        the same number of experts at ``level``).
    mask : str or int, optional
        The batch item holding a padding mask: padded tokens are not counted.
    ignore_index : int or None, default -100
        Predictions labelled so are not counted, as padding.
    n_classes : int, optional
    batch_size : int, default 1024
        For data given as a tensor or mapping.

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
    evaluated = _evaluated(model)
    target = evaluated
    if layer is not None:
        holders = [name for name, m in evaluated.named_modules() if isinstance(m, MuMoE)]
        try:
            target = evaluated.get_submodule(layer)
        except AttributeError:
            raise ValueError(
                f"layer={layer!r} is not a module of the model; its μMoE layers are {holders}"
            ) from None
    layers, _ = _resolve(target, {}, level)
    n = layers[0].network.expert_dims[level]
    source = LabelSource(labels)
    drop = inputs_dropped(labels, mask)
    counts: list[np.ndarray] = []
    seen = False
    with torch.no_grad():
        for batch in batches(data, batch_size):
            seen = True
            before = _predictions(evaluated, batch, drop)
            keep = np.ones(before.shape, dtype=bool)
            if mask is not None:
                keep = _row_values(field(batch, mask, "mask"), before.shape, "mask") != 0
            batch_labels = _row_values(
                source.next(batch, samples_of(batch)), before.shape, "labels"
            )
            if ignore_index is not None:
                keep &= batch_labels != ignore_index
            classes, n_seen = check_labels(batch_labels[keep], int(keep.sum()), n_classes)
            changed = np.zeros((n, classes.shape[0]), dtype=bool)
            for expert in range(n):
                with edit_experts(target, {expert: 0.0}, level=level):
                    changed[expert] = (_predictions(evaluated, batch, drop) != before)[keep]
            width = n_seen if n_classes is None else n_classes
            counts.append(np.stack([np.bincount(classes[c], minlength=width) for c in changed]))
    if not seen:
        raise ValueError("data yielded no batches: there is nothing to count")
    source.finish()
    width = max(c.shape[1] for c in counts)
    return sum(
        (np.pad(c, ((0, 0), (0, width - c.shape[1]))) for c in counts),
        np.zeros((n, width), dtype=np.int64),
    )


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
    names = [name for name, module in model.named_modules() if isinstance(module, MuMoEGate)]
    with _watching(model, names, record.__setitem__):  # a gate's last call
        yield record
