r"""The forward contraction when some expert levels come as supports (sparse gates).

A level given by each row's support (``k`` indices and values, a
:class:`~mumoe.typing.SparseGate`) replaces its expert leg :math:`n_e` of
size :math:`N_e` by a per-row leg :math:`\kappa_e` of size ``k``: the gate
operand becomes the values ``(B, k)``, and each core holding :math:`n_e`
becomes that core *gathered* at the row's indices, ``(B, k, rest)``.  Then
the usual path search and compiled program take over, at sizes where ``k``
stands for :math:`N_e`.

Where a sparse leg sits in one core alone, and no other sparse leg shares
that core, the values and the gathered core are contracted at once, as a
weighted gather (:func:`mumoe.functional.gather_sum`: ``embedding_bag`` on
torch), and neither the values nor the ``(B, k, rest)`` copy become operands:
the core is *fused*, an operand ``(B, rest)``.  That covers the expert leg of
CP, TT, TR, Tucker's factor, MxD and every level of a hierarchical network
of them; hyperedge expert legs (per-expert low rank) and cores holding two
sparse legs (dense) are gathered.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import opt_einsum

from mumoe.spec import Network
from mumoe.typing import Shape

__all__ = ["SparseLayout", "check_crossover", "expert_widths", "sparse_layout"]


@dataclass(frozen=True)
class SparseLayout:
    r"""Which operands a forward pass with some levels given as supports contracts.

    The operands, in order: the dense gates (:attr:`dense_levels`), the values
    of the levels whose supports stay operands (:attr:`value_levels`), the
    input ``x``, then one operand per core: the core itself, its weighted
    gather (:attr:`fused`) or its gather (:attr:`gathered`).

    Parameters
    ----------
    levels : tuple of int
        The levels contracted from their supports.
    dense_levels : tuple of int
        The levels whose gates are dense operands ``(B, N_e)``.
    value_levels : tuple of int
        Sparse levels whose values are operands ``(B, k_e)``: those gathered
        into cores (:attr:`gathered`) rather than fused.
    fused : tuple of (core, level, axis)
        Cores contracted with a level's support at once (a weighted gather
        along ``axis``), each an operand ``(B, rest)``.
    gathered : tuple of (core, ((level, axis), ...))
        Cores indexed at the supports of the levels listed, each an operand
        ``(B, k_e, ..., rest)``.
    equation : str
        The contraction of those operands, in the network's symbols (the
        per-row legs after them).

    Examples
    --------
    >>> from mumoe import cp
    >>> layout = sparse_layout(cp(8, 4, expert_dims=(16, 16), rank=3), (0, 1))
    >>> layout.fused, layout.equation
    (((0, 0, 0), (1, 1, 0)), 'ad,af,af,df,ef->ae')
    """

    levels: tuple[int, ...]
    dense_levels: tuple[int, ...]
    value_levels: tuple[int, ...]
    fused: tuple[tuple[int, int, int], ...]
    gathered: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    equation: str

    @property
    def input_position(self) -> int:
        """Where ``x`` sits among the operands.

        Examples
        --------
        >>> from mumoe import lowrank
        >>> sparse_layout(lowrank(8, 4, expert_dims=(16, 4), rank=2), (0,)).input_position
        2
        """
        return len(self.dense_levels) + len(self.value_levels)

    def shapes(self, network: Network, batch_size: int, ks: dict[int, int]) -> list[Shape]:
        """The operand shapes for ``batch_size`` rows and ``ks[e]`` entries per support.

        Parameters
        ----------
        network : Network
            The network the layout was made for.
        batch_size : int
        ks : dict of int to int
            Entries per row of each sparse level's support.

        Returns
        -------
        list of tuple of int

        Examples
        --------
        >>> from mumoe import cp
        >>> net = cp(8, 4, expert_dims=(16, 16), rank=3)
        >>> sparse_layout(net, (0,)).shapes(net, 5, {0: 2})
        [(5, 16), (5, 9), (5, 3), (16, 3), (9, 3), (4, 3)]
        """
        shapes: list[Shape] = [(batch_size, network.expert_dims[e]) for e in self.dense_levels]
        shapes += [(batch_size, ks[e]) for e in self.value_levels]
        shapes.append((batch_size, *network.input_sizes))
        fused = {core: axis for core, _, axis in self.fused}
        gathered = dict(self.gathered)
        for c, shape in enumerate(network.core_shapes):
            if c in fused:
                axis = fused[c]
                shapes.append((batch_size, *shape[:axis], *shape[axis + 1 :]))
            elif c in gathered:
                axes = {axis for _, axis in gathered[c]}
                rest = tuple(size for a, size in enumerate(shape) if a not in axes)
                shapes.append((batch_size, *(ks[e] for e, _ in gathered[c]), *rest))
            else:
                shapes.append(shape)
        return shapes


@functools.lru_cache(maxsize=256)
def expert_widths(network: Network) -> tuple[int, ...]:
    """Per level, the entries of the cores holding its expert leg, per expert.

    A level's dense step multiplies ``B x N_e`` coefficients into them:
    ``B * N_e * width`` multiply-adds, what a gather of ``k`` rows replaces.

    Parameters
    ----------
    network : Network

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> from mumoe import cp, tt
    >>> expert_widths(cp(8, 4, expert_dims=(16, 4), rank=3))
    (3, 3)
    >>> expert_widths(tt(8, 4, expert_dims=16, rank=(2, 3)))  # the core (16, 2)
    (2,)
    """
    widths = []
    for leg, n in zip(network.expert_legs, network.expert_dims, strict=True):
        holders = [
            shape
            for legs, shape in zip(network.core_legs, network.core_shapes, strict=True)
            if leg in legs
        ]
        widths.append(sum(math.prod(shape) // n for shape in holders))
    return tuple(widths)


@functools.lru_cache(maxsize=256)
def sparse_layout(network: Network, levels: tuple[int, ...]) -> SparseLayout:
    """The layout of ``network``'s forward pass with ``levels`` given as supports.

    Parameters
    ----------
    network : Network
    levels : tuple of int
        The sparse levels, in increasing order.

    Returns
    -------
    SparseLayout

    Raises
    ------
    ValueError
        If a level is out of range or listed twice.

    Examples
    --------
    >>> from mumoe import lowrank
    >>> layout = sparse_layout(lowrank(8, 4, expert_dims=16, rank=2), (0,))
    >>> layout.gathered, layout.value_levels  # the expert leg is in both cores
    (((0, ((0, 0),)), (1, ((0, 0),))), (0,))
    """
    if sorted(set(levels)) != list(levels) or not all(0 <= e < network.n_levels for e in levels):
        raise ValueError(
            f"sparse levels must be distinct levels of the network (0 to "
            f"{network.n_levels - 1}) in increasing order, got {levels}"
        )
    legs = network.expert_legs
    holders = {
        e: [c for c, core in enumerate(network.core_legs) if legs[e] in core] for e in levels
    }
    fused: list[tuple[int, int, int]] = []
    gathered: dict[int, list[tuple[int, int]]] = {}
    for e in levels:
        (first, *others) = holders[e]
        core_legs = network.core_legs[first]
        shares = any(legs[f] in core_legs for f in levels if f != e)
        if not others and not shares:
            fused.append((first, e, core_legs.index(legs[e])))
        else:
            for c in holders[e]:
                gathered.setdefault(c, []).append((e, network.core_legs[c].index(legs[e])))
    fused_levels = {e for _, e, _ in fused}
    value_levels = tuple(e for e in levels if e not in fused_levels)
    dense_levels = tuple(e for e in range(network.n_levels) if e not in levels)

    batch = network.batch_symbol
    kappa = {e: opt_einsum.get_symbol(len(network.symbols) + 1 + e) for e in levels}
    terms = [network.term([legs[e]], batch=True) for e in dense_levels]
    terms += [batch + kappa[e] for e in value_levels]
    terms.append(network.term(network.input_legs, batch=True))
    fused_at = {c: e for c, e, _ in fused}
    for c, core_legs in enumerate(network.core_legs):
        if c in fused_at:
            kept = [leg for leg in core_legs if leg != legs[fused_at[c]]]
            terms.append(batch + network.term(kept))
        elif c in gathered:
            indexed = {legs[e] for e, _ in gathered[c]}
            kept = [leg for leg in core_legs if leg not in indexed]
            terms.append(batch + "".join(kappa[e] for e, _ in gathered[c]) + network.term(kept))
        else:
            terms.append(network.term(core_legs))
    equation = ",".join(terms) + "->" + network.term(network.output_legs, batch=True)
    return SparseLayout(
        levels=tuple(levels),
        dense_levels=dense_levels,
        value_levels=value_levels,
        fused=tuple(sorted(fused)),
        gathered=tuple((c, tuple(pairs)) for c, pairs in sorted(gathered.items())),
        equation=equation,
    )


def check_crossover(crossover: Any) -> float | None:
    """``crossover`` as a float from 0 to 1, or None.

    Parameters
    ----------
    crossover : float or None
        A support density ``k / N`` (see :class:`Planner`).

    Returns
    -------
    float or None

    Raises
    ------
    TypeError
        If it is not a real number (a bool is not).
    ValueError
        If it is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> check_crossover(0.25), check_crossover(None)
    (0.25, None)
    """
    if crossover is None:
        return None
    if isinstance(crossover, bool | np.bool_) or not isinstance(
        crossover, int | float | np.integer | np.floating
    ):
        raise TypeError(f"crossover must be a number from 0 to 1, got {crossover!r}")
    if not 0.0 <= float(crossover) <= 1.0:
        raise ValueError(
            f"crossover must be a support density k / N from 0 (always dense) to 1 (sparse "
            f"whenever a support is given), got {crossover!r}"
        )
    return float(crossover)
