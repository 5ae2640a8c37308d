r"""Expert surgery on μMoE layers and blocks: export, remove and merge experts.

:func:`expert_linear` and :func:`mixture_linear` export one expert, or a fixed
mixture of experts, as plain torch layers (exact up to rounding);
:func:`remove_experts_` drops experts of one level from a layer or a block
(cores, gate, network), the kept experts unchanged; :func:`merge_experts_`
removes the experts within a relative distance of a kept one and reports
what changed.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import opt_einsum
import torch
from torch import nn

from mumoe.backends import thread_backend
from mumoe.functional import check_level, matrix_form
from mumoe.nn._block import MuMoEBlock
from mumoe.nn._gate import MuMoEGate
from mumoe.nn._layers import MuMoE
from mumoe.plan import Planner, planner_of
from mumoe.spec import Network

__all__ = [
    "MergeReport",
    "MergedGroup",
    "expert_linear",
    "merge_experts_",
    "mixture_linear",
    "remove_experts_",
]

#: Slack of the Gram screen of :func:`merge_experts_`, relative to the two squared norms:
#: float64 rounding of the Gram entries is far below it, so no close pair is screened out.
_SCREEN_SLACK = 1e-9


def _layers_of(module: Any, what: str) -> tuple[list[MuMoE], MuMoEGate | None]:
    # The μMoE layers that share the experts, and their gate.
    if isinstance(module, MuMoEBlock):
        return module.mumoe_layers, module.gate
    if isinstance(module, MuMoE):
        return [module], module.gate
    raise TypeError(f"{what} takes a mumoe.nn.MuMoE or MuMoEBlock, got {type(module).__qualname__}")


# ------------------------------------------------------------------ export


def _expert_vectors(network: Network, index: Any, like: torch.Tensor) -> list[torch.Tensor]:
    # One-hot coefficient vectors of the expert ``index`` (one index per level).
    indices = (index,) if isinstance(index, numbers.Integral) else tuple(index)
    if len(indices) != network.n_levels:
        raise ValueError(
            f"index must give one expert per level ({network.n_levels}: expert_dims "
            f"{network.expert_dims}), got {index!r}"
        )
    vectors = []
    for level, (n, idx) in enumerate(zip(network.expert_dims, indices, strict=True)):
        if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
            raise TypeError(f"the expert index of level {level} must be an int, got {idx!r}")
        position = operator.index(idx)
        if not -n <= position < n:
            raise ValueError(f"expert {position} is out of range for level {level} of size {n}")
        vector = torch.zeros(n, dtype=like.dtype, device=like.device)
        vector[position % n] = 1
        vectors.append(vector)
    return vectors


def _is_vector(value: Any) -> bool:
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.ndim == 1
    return isinstance(value, Sequence) and all(isinstance(v, numbers.Number) for v in value)


def _gate_vectors(network: Network, gates: Any, like: torch.Tensor) -> list[torch.Tensor]:
    # The fixed coefficients, one (N_e,) vector per level, in the cores' dtype and device.
    if network.n_levels == 1 and _is_vector(gates):
        gates = [gates]
    if isinstance(gates, str) or not isinstance(gates, Sequence):
        raise TypeError(
            f"gates must be a sequence of {network.n_levels} vectors (one per level), "
            f"got {type(gates).__qualname__}"
        )
    if len(gates) != network.n_levels:
        raise ValueError(
            f"gates must hold one vector per level ({network.n_levels}: expert_dims "
            f"{network.expert_dims}), got {len(gates)}"
        )
    vectors = []
    for level, (n, gate) in enumerate(zip(network.expert_dims, gates, strict=True)):
        vector = torch.as_tensor(gate, dtype=like.dtype, device=like.device)
        if tuple(vector.shape) != (n,):
            raise ValueError(
                f"the coefficients of level {level} must have shape ({n},), "
                f"got {tuple(vector.shape)}"
            )
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(f"the coefficients of level {level} must be finite, got {vector}")
        vectors.append(vector)
    return vectors


def _mixed_linear(
    layer: MuMoE, vectors: list[torch.Tensor], extra_bias: torch.Tensor | None = None
) -> nn.Linear:
    r""":math:`\sum a_1[n_1] \cdots a_E[n_E]\, W[n_1, \dots, n_E]` of ``layer`` as a Linear.

    The cores are contracted with the coefficient vectors directly (one
    einsum, no batch, ``W`` never formed); an edit in force
    (:meth:`~mumoe.nn.MuMoE.scaled_experts`) scales the coefficients, as in
    the forward pass.
    """
    network, cores = layer._weights()
    scales = layer._expert_scales
    vectors = [v * scales[e].to(v) if e in scales else v for e, v in enumerate(vectors)]
    terms = [network.term([leg]) for leg in network.expert_legs]
    terms += [network.term(legs) for legs in network.core_legs]
    equation = ",".join(terms) + "->" + network.term(_role_legs(network))
    matrix = _matrix(network, opt_einsum.contract(equation, *vectors, *(c.detach() for c in cores)))
    n_in = network.in_features
    bias = matrix[n_in] if network.bias else None
    if extra_bias is not None:
        bias = extra_bias.detach() if bias is None else bias + extra_bias.detach()
    linear = nn.Linear(
        n_in, network.out_features, bias=bias is not None, device=matrix.device, dtype=matrix.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(matrix[:n_in].T)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _exported(module: MuMoE | MuMoEBlock, vectors: list[torch.Tensor]) -> nn.Module:
    if isinstance(module, MuMoE):
        linear = _mixed_linear(module, vectors)
        if module.input_norm is None:
            return linear
        return nn.Sequential(copy.deepcopy(module.input_norm), linear)
    if module.glu:
        raise ValueError(
            "a GLU block's expert is act(fc1(x)) * up(x), not a chain of layers: export "
            "its μMoE layers one by one (expert_linear(block.fc1, ...), block.up, block.fc2)"
        )
    parts: list[nn.Module] = []
    if module.input_norm is not None:
        parts.append(copy.deepcopy(module.input_norm))
    fc1 = module.fc1
    parts.append(_mixed_linear(fc1, vectors) if isinstance(fc1, MuMoE) else copy.deepcopy(fc1))
    parts.append(copy.deepcopy(module.act))
    parts.append(_mixed_linear(module.fc2, vectors, module.bias))
    return nn.Sequential(*parts)


def expert_linear(module: MuMoE | MuMoEBlock, index: int | Sequence[int]) -> nn.Module:
    r"""One expert of a μMoE layer as an ``nn.Linear`` (of a block: as an MLP).

    The expert :math:`(n_1, \dots, n_E)` is the affine map
    :math:`x \mapsto x\,\mathcal{W}[n_1, \dots, n_E, :I] + \mathcal{W}[n_1,
    \dots, n_E, I]`: what the layer computes when that expert's coefficient is
    1 on every level and every other is 0.  The result holds copies of the
    weights, on the cores' device and in their dtype, exact up to rounding.
    An expert is one index per level: one level's expert alone is a linear
    map only once the other levels' coefficients are fixed, which is
    :func:`mixture_linear` with a one-hot vector on that level.

    Parameters
    ----------
    module : MuMoE or MuMoEBlock
        A layer exports ``nn.Linear(in_features, out_features,
        bias=network.bias)``, preceded by a copy of its ``input_norm`` in an
        ``nn.Sequential`` when it has one.  A block exports
        ``nn.Sequential([input_norm,] fc1, act, fc2)``: its μMoE layers as
        linears of the same expert (a dense encoder and the shared output
        bias copied as they are).  An edit in force
        (:meth:`~mumoe.nn.MuMoE.scaled_experts`) scales the expert, as it
        does in the forward pass.
    index : int or sequence of int
        One expert per level (an int with one level); negative indices count
        from the end.

    Returns
    -------
    torch.nn.Linear or torch.nn.Sequential

    Raises
    ------
    TypeError
        If ``module`` is neither a MuMoE nor a MuMoEBlock, or an index is not
        an int.
    ValueError
        If ``index`` has the wrong length or is out of range, or for a GLU
        block (``act(fc1(x)) * up(x)`` is no chain of layers: export its layers).

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(8, 3, "tt", expert_dims=(4, 2), rank=2)
    >>> linear = expert_linear(layer, (3, 1))
    >>> x = torch.randn(5, 8)
    >>> gates = [torch.tensor([0.0, 0, 0, 1]).expand(5, 4), torch.tensor([0.0, 1]).expand(5, 2)]
    >>> torch.allclose(linear(x), layer(x, gates), atol=1e-6)
    True
    """
    layers, _ = _layers_of(module, "expert_linear")
    weight = next(iter(layers[0]._weights()[1]))
    return _exported(module, _expert_vectors(layers[0].network, index, weight))


def mixture_linear(module: MuMoE | MuMoEBlock, gates: Any) -> nn.Module:
    r"""A fixed mixture of the experts as an ``nn.Linear`` (of a block: as an MLP).

    .. math::
        W_a = \sum_{n_1, \dots, n_E} a_1[n_1] \cdots a_E[n_E]\,
        \mathcal{W}[n_1, \dots, n_E]

    what the layer computes (Eq. 1) when every token's gates are ``gates``.
    The cores are contracted with the coefficient vectors, never forming
    :math:`\mathcal{W}`; the sums of the vectors need not be 1.  A block
    mixes every μMoE layer with the same vectors, as its shared gate does.

    Parameters
    ----------
    module : MuMoE or MuMoEBlock
        As for :func:`expert_linear`.
    gates : sequence of array-like, each (N_e,)
        One coefficient vector per level; with one level, the vector alone
        may be given.

    Returns
    -------
    torch.nn.Linear or torch.nn.Sequential
        As for :func:`expert_linear`.

    Raises
    ------
    TypeError
        If ``module`` is neither a MuMoE nor a MuMoEBlock, or ``gates`` is
        not a sequence of vectors.
    ValueError
        If a vector has the wrong shape or a non-finite value, or for a GLU
        block.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(8, 3, "cp", expert_dims=4, rank=2)
    >>> a = torch.tensor([0.5, 0.0, 0.25, 0.25])
    >>> x = torch.randn(5, 8)
    >>> torch.allclose(mixture_linear(layer, a)(x), layer(x, a.expand(5, 4)), atol=1e-6)
    True
    """
    layers, _ = _layers_of(module, "mixture_linear")
    weight = next(iter(layers[0]._weights()[1]))
    return _exported(module, _gate_vectors(layers[0].network, gates, weight))


# ------------------------------------------------------------------ removal


def _check_editable(layers: list[MuMoE], what: str) -> None:
    for layer in layers:
        if not layer._owns_cores:
            raise TypeError(
                f"{type(layer).__qualname__} does not own its cores; {what} needs a MuMoE "
                "whose cores are its parameters (edit the factorized tensor instead)"
            )
        if layer._expert_scales or layer.__dict__.get("_edit_owner"):
            raise RuntimeError(
                f"an expert edit (scaled_experts, edit_experts) is in force on this layer; "
                f"call {what} after its with-block"
            )
        if layer._modules.get("bond_regularizer") is not None:
            raise ValueError(
                f"the layer has a bond regularizer, which computes with its cores normalised; "
                f"prune_bonds(layer, ...) folds it in: call {what} after"
            )


def _expert_set(experts: Iterable[Any], n: int, level: int) -> set[int]:
    if isinstance(experts, numbers.Integral) or (
        isinstance(experts, torch.Tensor) and experts.dim() == 0
    ):
        experts = [experts]
    chosen: set[int] = set()
    for expert in experts:
        if isinstance(expert, bool):
            raise TypeError(f"expert indices must be ints, got {expert!r}")
        try:
            index = operator.index(expert)
        except TypeError:
            raise TypeError(f"expert indices must be ints, got {expert!r}") from None
        if not -n <= index < n:
            raise ValueError(f"expert {index} is out of range for level {level} of size {n}")
        if index % n in chosen:
            raise ValueError(f"expert {index % n} of level {level} is given twice")
        chosen.add(index % n)
    if len(chosen) == n:
        raise ValueError(
            f"cannot remove all {n} experts of level {level}: a level keeps at least one"
        )
    return chosen


def _selected(param: torch.Tensor, axis: int, index: torch.Tensor) -> nn.Parameter:
    kept = param.detach().index_select(axis, index.to(param.device))
    return nn.Parameter(kept, requires_grad=param.requires_grad)


def _check_gate(gate: MuMoEGate, level: int, n_kept: int) -> None:
    if gate.top_k is not None and gate.top_k > n_kept:
        raise ValueError(
            f"the gate keeps top_k={gate.top_k} experts per token, more than the {n_kept} "
            f"left at level {level}; remove fewer experts (top_k <= experts kept)"
        )
    norm = gate.norms[level]
    if not isinstance(norm, nn.BatchNorm1d | nn.LayerNorm | nn.Identity):
        raise TypeError(
            f"the gate's norm of level {level} is a {type(norm).__qualname__}; "
            "expected BatchNorm1d, LayerNorm or Identity"
        )


def _shrunk_norm(norm: nn.Module, index: torch.Tensor) -> nn.Module:
    n = len(index)
    new: nn.Module
    if isinstance(norm, nn.BatchNorm1d):
        stats = norm.running_mean
        new = nn.BatchNorm1d(
            n,
            eps=norm.eps,
            momentum=norm.momentum,
            affine=norm.affine,
            track_running_stats=norm.track_running_stats,
            device=None if stats is None else stats.device,
            dtype=None if stats is None else stats.dtype,
        )
        with torch.no_grad():
            for name in ("running_mean", "running_var"):
                stat = getattr(norm, name)
                if stat is not None:
                    getattr(new, name).copy_(stat.index_select(0, index.to(stat.device)))
            if norm.num_batches_tracked is not None and new.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(norm.num_batches_tracked)
    elif isinstance(norm, nn.LayerNorm):
        new = nn.LayerNorm(n, eps=norm.eps, elementwise_affine=False, bias=False)
    else:
        return norm
    for name, param in norm.named_parameters(recurse=False):  # affine norms (not mumoe's own)
        setattr(new, name, _selected(param, 0, index))
    return new.train(norm.training)


def _same_policy(planner: Planner, network: Network) -> Planner:
    return planner_of(
        network,
        optimize=planner.optimize,
        autotune=planner.autotune,
        cache_size=planner.cache.maxsize,
        memory_limit=planner.memory_limit,
        crossover=planner.crossover,
    )


def remove_experts_(
    module: MuMoE | MuMoEBlock, experts: Iterable[int], *, level: int = 0
) -> tuple[int, ...]:
    r"""Remove experts of one level, in place: the kept experts are unchanged.

    Every core holding the level's expert leg (each core of a hyperedge, as
    in ``"mxd"`` or ``"lowrank"``) keeps the other slices along it; the
    gate keeps the other columns of its projection, bias entries and
    batch-norm running statistics; ``network`` becomes the network with
    :math:`N_e` smaller, and the layer's planner one of it under the same
    policy.  So :math:`\mathcal{W}[\dots, n_e, \dots]` of every kept expert
    is unchanged (up to the rounding of a new contraction order), and so are
    the gate's logits of the kept experts, except under
    ``normalization="ln"``, which normalises over the experts there are.
    The coefficients then come from the activation over fewer experts:
    tokens that gave the removed experts coefficient 0 (an entmax-1.5,
    sparsemax or top-k gate) keep every coefficient, hence their output;
    the others' coefficients change.

    The kept cores and gate entries are new parameters (dtype, device and
    ``requires_grad`` kept): build the optimiser again afterwards.  Nothing
    is changed when an error is raised.

    Parameters
    ----------
    module : MuMoE or MuMoEBlock
        A block's μMoE layers and its shared gate shrink together; a layer
        of a block must be edited through its block.
    experts : iterable of int
        The experts of ``level`` to remove (negative indices count from the
        end); an empty one changes nothing.
    level : int, default 0
        The expert level (0-based).

    Returns
    -------
    tuple of int
        The kept experts' former indices, in order: the new index ``k`` was
        expert ``kept[k]``.

    Raises
    ------
    TypeError
        If ``module`` is neither a MuMoE nor a MuMoEBlock, does not own its
        cores (:class:`~mumoe.nn.FactorizedMuMoE`), or an index is not an int.
    ValueError
        If ``level`` or an expert is out of range, an expert is given twice,
        every expert of the level would go, or the gate's ``top_k`` would
        exceed the experts kept.
    RuntimeError
        Inside an :func:`~mumoe.nn.edit_experts` block on the layer.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(8, 3, "cp", expert_dims=(6, 2), rank=4)
    >>> before = layer.expert_weight((4, 1)).weight
    >>> remove_experts_(layer, [0, 2], level=0)
    (1, 3, 4, 5)
    >>> layer.network.expert_dims, layer.gate.expert_dims
    ((4, 2), (4, 2))
    >>> torch.allclose(layer.expert_weight((2, 1)).weight, before)
    True
    """
    layers, gate = _layers_of(module, "remove_experts_")
    if gate is None:
        raise ValueError(
            f"{type(module).__name__} has no gate of its own: a MuMoEBlock's layer shares the "
            "block's gate, so remove the experts through the block (remove_experts_(block, ...))"
        )
    _check_editable(layers, "remove_experts_")
    network = layers[0].network
    level = check_level(level, network)
    n = network.expert_dims[level]
    removed = _expert_set(experts, n, level)
    kept = tuple(k for k in range(n) if k not in removed)
    _check_gate(gate, level, len(kept))
    if not removed:
        return kept
    index = torch.tensor(kept, dtype=torch.long)
    leg = network.expert_legs[level]
    # Everything new is built first, then assigned: an error leaves the module as it was.
    updates = []
    for layer in layers:
        net = layer.network
        cores = {
            k: _selected(layer.cores[k], legs.index(leg), index)
            for k, legs in enumerate(net.core_legs)
            if leg in legs
        }
        dims = list(net.expert_dims)
        dims[level] = len(kept)
        shrunk = net.replace(expert_dims=tuple(dims))
        updates.append((layer, cores, shrunk, _same_policy(layer.planner, shrunk)))
    projection = _selected(gate.projections[level], 1, index)
    bias = None if gate.biases is None else _selected(gate.biases[level], 0, index)
    norm = _shrunk_norm(gate.norms[level], index)
    for layer, cores, shrunk, planner in updates:
        for k, core in cores.items():
            layer.cores[k] = core
        layer.network = shrunk
        layer.planner = planner
    gate.projections[level] = projection
    if gate.biases is not None and bias is not None:
        gate.biases[level] = bias
    gate.norms[level] = norm
    gate.expert_dims = tuple(len(kept) if e == level else d for e, d in enumerate(gate.expert_dims))
    return kept


# ------------------------------------------------------------------ merging


@dataclass(frozen=True)
class MergedGroup:
    """Experts merged into one: the kept expert and those removed for it.

    Parameters
    ----------
    kept : int
        The lowest index of the group (numbering before the merge).
    removed : tuple of int
        The experts removed (numbering before the merge).
    distances : tuple of float
        Each removed expert's relative distance to the kept one.

    Examples
    --------
    >>> MergedGroup(kept=0, removed=(3,), distances=(0.0,)).removed
    (3,)
    """

    kept: int
    removed: tuple[int, ...]
    distances: tuple[float, ...]


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_experts_` changed.

    Parameters
    ----------
    level : int
    tolerance : float
    groups : tuple of MergedGroup
        In order of their kept expert; indices as before the merge.
    n_before, n_after : int
        The experts of ``level`` before and after.
    params_before, params_after : int
        The module's parameters before and after (cores, gate and the rest).

    Examples
    --------
    >>> report = MergeReport(0, 0.0, (MergedGroup(1, (2, 4), (0.0, 0.0)),), 5, 3, 50, 30)
    >>> report.removed
    (2, 4)
    """

    level: int
    tolerance: float
    groups: tuple[MergedGroup, ...]
    n_before: int
    n_after: int
    params_before: int
    params_after: int

    @property
    def removed(self) -> tuple[int, ...]:
        """Every removed expert (numbering before the merge), in order."""
        return tuple(sorted(j for group in self.groups for j in group.removed))


def _float64_cores(layer: MuMoE) -> list[torch.Tensor]:
    return [c.detach().to(torch.float64) for c in layer.cores]


def _gram(layer: MuMoE, level: int) -> torch.Tensor:
    r"""The Gram matrix :math:`\langle W_j, W_k \rangle` of the level's slices, in float64.

    The network contracted with a copy of itself whose expert leg of
    ``level`` and bonds are renamed: no slice is formed.
    """
    network, cores = layer.network, _float64_cores(layer)
    leg = network.expert_legs[level]
    fresh = (opt_einsum.get_symbol(k) for k in itertools.count(len(network.symbols) + 1))
    twin = {name: next(fresh) for name in (leg, *network.bonds)}
    copies = [network.term(legs) for legs in network.core_legs]
    copies += ["".join(twin.get(x, network.symbols[x]) for x in legs) for legs in network.core_legs]
    equation = ",".join(copies) + "->" + network.symbols[leg] + twin[leg]
    return opt_einsum.contract(equation, *cores, *cores)


def _slice(layer: MuMoE, level: int, expert: int) -> torch.Tensor:
    # W[..., n_e = expert, ...] in float64: identical slices of the cores give identical bits.
    network, cores = layer.network, _float64_cores(layer)
    leg = network.expert_legs[level]
    operands, terms = [], []
    for core, legs in zip(cores, network.core_legs, strict=True):
        operands.append(core.select(legs.index(leg), expert) if leg in legs else core)
        terms.append(network.term([x for x in legs if x != leg]))
    kept = [x for x in network.expert_legs if x != leg]
    equation = ",".join(terms) + "->" + network.term([*kept, *_role_legs(network)])
    return _matrix(network, opt_einsum.contract(equation, *operands))


def _role_legs(network: Network) -> list[str]:
    return [*network.input_legs, *network.output_legs]


def _matrix(network: Network, weight: torch.Tensor) -> torch.Tensor:
    # W in its matrix form (..., I', O): the legs of a split input or output joined.
    with thread_backend("pytorch"):
        return matrix_form(network, weight)


def _relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)))
    return 0.0 if scale == 0 else float(torch.linalg.vector_norm(a - b)) / scale


def _close_groups(layers: list[MuMoE], level: int, tolerance: float) -> list[MergedGroup]:
    # Screen every pair with the Gram matrices (cheap, but cancellation blurs distances
    # of about 1e-8), then decide each candidate on the slices themselves.
    n = layers[0].network.expert_dims[level]
    candidate = torch.ones(n, n, dtype=torch.bool)
    for layer in layers:
        gram = _gram(layer, level).cpu()
        norms = gram.diagonal()
        rows, cols = norms[:, None], norms[None, :]
        squared = rows + cols - 2 * gram
        bound = tolerance**2 * torch.maximum(rows, cols) + _SCREEN_SLACK * (rows + cols)
        candidate &= squared <= bound
    assigned = [False] * n
    groups = []
    for k in range(n):
        others = [j for j in range(k + 1, n) if not assigned[j] and candidate[k, j]]
        if assigned[k] or not others:
            continue
        keeper = [_slice(layer, level, k) for layer in layers]
        removed, distances = [], []
        for j in others:
            distance = max(
                _relative_distance(mine, _slice(layer, level, j))
                for mine, layer in zip(keeper, layers, strict=True)
            )
            if distance <= tolerance:
                assigned[j] = True
                removed.append(j)
                distances.append(distance)
        if removed:
            groups.append(MergedGroup(k, tuple(removed), tuple(distances)))
    return groups


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def merge_experts_(module: MuMoE | MuMoEBlock, *, tolerance: float, level: int = 0) -> MergeReport:
    r"""Merge the experts of one level whose weights are close, in place, and report it.

    The experts of ``level`` are the slices :math:`W_n = \mathcal{W}[\dots,
    n, \dots]` (every other level's experts, input and output), compared by
    the relative Frobenius distance

    .. math::
        d(j, k) = \lVert W_j - W_k \rVert_F / \max(\lVert W_j \rVert_F, \lVert W_k \rVert_F)

    (0 for two zero slices); in a block, the largest over its μMoE layers.
    Going up from expert 0, each expert not yet merged keeps every later one
    within ``tolerance`` of it, and those are removed with
    :func:`remove_experts_`.  Pairs are screened through the factors (the
    Gram matrix of the slices, never forming :math:`\mathcal{W}`) and each
    candidate is decided on the two slices in float64, so ``tolerance=0``
    merges exactly the experts whose weights are equal.

    The kept experts are unchanged, and each removed one is replaced by a
    kept one within ``tolerance`` of it.  The gate is not made to match:
    the removed experts' projection columns are dropped, and their tokens'
    coefficients come from the activation over fewer experts, so outputs
    change beyond what the distances imply (no reassignment of gate mass is
    exact for a learnt, normalised gate).

    Parameters
    ----------
    module : MuMoE or MuMoEBlock
        As for :func:`remove_experts_`.
    tolerance : float
        The largest relative distance merged, at least 0.
    level : int, default 0

    Returns
    -------
    MergeReport

    Raises
    ------
    TypeError, ValueError, RuntimeError
        As :func:`remove_experts_`; ``ValueError`` also for a negative or
        non-finite ``tolerance`` (a ``TypeError`` if it is not a number).

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(8, 3, "cp", expert_dims=5, rank=4)
    >>> with torch.no_grad():
    ...     _ = layer.cores[0].normal_()
    ...     layer.cores[0][3] = layer.cores[0][1]  # expert 3 is a copy of expert 1
    >>> report = merge_experts_(layer, tolerance=0.0)
    >>> report.groups, report.n_after
    ((MergedGroup(kept=1, removed=(3,), distances=(0.0,)),), 4)
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(f"tolerance must be a number, got {tolerance!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be finite and at least 0, got {tolerance!r}")
    layers, _ = _layers_of(module, "merge_experts_")
    _check_editable(layers, "merge_experts_")
    level = check_level(level, layers[0].network)
    n_before = layers[0].network.expert_dims[level]
    params_before = _n_params(module)
    with torch.no_grad():
        groups = _close_groups(layers, level, float(tolerance))
    report_removed = [j for group in groups for j in group.removed]
    kept = remove_experts_(module, report_removed, level=level)
    return MergeReport(
        level=level,
        tolerance=float(tolerance),
        groups=tuple(groups),
        n_before=n_before,
        n_after=len(kept),
        params_before=params_before,
        params_after=_n_params(module),
    )
