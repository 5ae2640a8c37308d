r"""The parameter-budget solver: choose the rank of a format to fit a parameter budget.

The paper compares μMoE layers with the linear layers they replace at equal
parameter count: the rank is the largest one whose layer (the factorised
weights plus, by default, the gate projections :math:`G_e \in
\mathbb{R}^{I \times N_e}`) has no more parameters than the budget.

One integer :math:`r` is free per format, as in the paper's experiments
(each format's ``free_rank`` hook in :data:`mumoe.spec.FORMATS`):

========  ================================================================
format    rank returned for a free :math:`r`
========  ================================================================
cp        :math:`r`
tucker    ``(expert_rank,) * E + (r, r)``: the input and output ranks
tt        ``(expert_rank,) * E + (r,)``: the bond between input and output
tr        ``(expert_rank,) * (E + 1) + (r,)``: the bond between input and
          output; every bond that touches an expert core is ``expert_rank``
========  ================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mumoe.spec._formats import FORMATS
from mumoe.spec._presets import preset, ttm_shapes
from mumoe.typing import Rank
from mumoe.validation import positive_int, positive_ints

__all__ = ["Budget", "as_budget", "gate_params", "linear_params", "match_rank", "resolve_budget"]


@dataclass(frozen=True)
class Budget:
    """A parameter budget that chooses a format's rank: the explicit way to ask for one.

    ``rank=Budget(0.5)`` gives a layer at most half the parameters of the
    ``nn.Linear`` of its sizes, ``rank=Budget(params=100_000)`` at most that
    many, and ``rank="same"`` is ``Budget(1.0)``; the rank is the largest
    that fits (:func:`match_rank`), the gate projections counted.

    Parameters
    ----------
    fraction : float, optional
        Of the parameters of ``nn.Linear(in_features, out_features)``; positive.
    params : int, optional
        A parameter count.  Exactly one of ``fraction`` and ``params``.

    Examples
    --------
    >>> Budget(0.5).count(768, 1000, bias=True), Budget(params=1000).count(768, 1000, bias=True)
    (384500, 1000)
    """

    fraction: float | None = None
    params: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.params is None):
            raise ValueError(
                "a Budget is a fraction of the linear layer's parameters or a count: "
                f"give exactly one, got fraction={self.fraction!r}, params={self.params!r}"
            )
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
                raise TypeError(f"Budget fraction must be a number, got {self.fraction!r}")
            if not (math.isfinite(self.fraction) and self.fraction > 0):
                raise ValueError(
                    f"Budget fraction must be positive and finite, got {self.fraction}"
                )
        else:
            positive_int(self.params, "Budget params")

    def count(self, in_features: int, out_features: int, bias: bool) -> int:
        """The budget in parameters, for a layer of these sizes.

        Parameters
        ----------
        in_features, out_features : int
        bias : bool

        Returns
        -------
        int

        Examples
        --------
        >>> Budget(1.0).count(4, 2, bias=True)  # nn.Linear(4, 2): 4 x 2 + 2
        10
        """
        if self.params is not None:
            return int(self.params)
        return int(self.fraction * linear_params(in_features, out_features, bias))  # type: ignore[operator]


def as_budget(rank: Any) -> Budget | None:
    """``rank`` as a :class:`Budget` if it asks for one, else None.

    ``"same"`` is ``Budget(1.0)``.  A bare float is refused: ``rank=0.5``
    reads like a rank, not a fraction of ``nn.Linear``'s parameters; a
    budget is asked for with ``Budget(0.5)``.

    Parameters
    ----------
    rank : any
        A layer's ``rank`` argument.

    Returns
    -------
    Budget or None

    Raises
    ------
    ValueError
        For a string other than ``"same"``.
    TypeError
        For a float, naming :class:`Budget`.

    Examples
    --------
    >>> as_budget("same"), as_budget(Budget(0.5)), as_budget(8)
    (Budget(fraction=1.0, params=None), Budget(fraction=0.5, params=None), None)
    """
    if isinstance(rank, Budget):
        return rank
    if isinstance(rank, str):
        if rank != "same":
            raise ValueError(f"a rank given as a string must be 'same', got {rank!r}")
        return Budget(1.0)
    if isinstance(rank, float):
        raise TypeError(
            f"rank={rank!r} is a float; a rank is an int (or a tuple or mapping of ints), "
            f"and a parameter budget is mumoe.Budget({rank!r}) ({rank} x nn.Linear's "
            "parameters) or 'same'"
        )
    return None


def linear_params(in_features: int, out_features: int, bias: bool = True) -> int:
    """Parameters of ``torch.nn.Linear(in_features, out_features, bias=bias)``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True

    Returns
    -------
    int

    Examples
    --------
    >>> linear_params(768, 1000)
    769000
    """
    return (in_features + int(bias)) * out_features


def gate_params(in_features: int, expert_dims: int | Sequence[int], bias: bool = False) -> int:
    r"""Parameters of the gate, :math:`I \sum_e N_e`; :math:`(I + 1) \sum_e N_e` with a bias.

    Parameters
    ----------
    in_features : int
        :math:`I`.
    expert_dims : int or sequence of int
        :math:`N_1, \dots, N_E`.
    bias : bool, default False
        Whether the gate has a bias per expert (``MuMoEGate(bias=True)``).

    Returns
    -------
    int

    Examples
    --------
    >>> gate_params(768, (32, 4)), gate_params(768, (32, 4), bias=True)
    (27648, 27684)
    """
    return (in_features + bool(bias)) * sum(positive_ints(expert_dims, "expert_dims"))


def resolve_budget(
    budget: Budget | int | float | str, in_features: int, out_features: int, bias: bool
) -> int:
    """A parameter budget as a count.

    Parameters
    ----------
    budget : Budget, int, float or "same"
        A :class:`Budget`; ``"same"``: as many parameters as the linear layer
        of the same sizes; a float: that fraction of it; an int: a count.
    in_features, out_features : int
    bias : bool

    Returns
    -------
    int

    Raises
    ------
    ValueError
        For a non-positive budget or an unknown string.

    Examples
    --------
    >>> resolve_budget("same", 768, 1000, True), resolve_budget(0.5, 768, 1000, True)
    (769000, 384500)
    """
    # Every form is a Budget, which checks it and counts it.
    if isinstance(budget, str):
        if budget != "same":
            raise ValueError(f"budget must be 'same', a float or an int, got {budget!r}")
        budget = Budget(1.0)
    elif isinstance(budget, float):
        budget = Budget(budget)
    elif not isinstance(budget, Budget):
        budget = Budget(params=positive_int(budget, "budget"))
    return budget.count(in_features, out_features, bias)


def match_rank(
    format: str,
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    budget: Budget | int | float | str = "same",
    bias: bool = True,
    gates: bool = True,
    gate_bias: bool = False,
    expert_rank: int = 4,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Rank:
    """The largest rank of a preset whose layer fits a parameter budget.

    Parameters
    ----------
    format : {"cp", "tucker", "tt", "tr"}
        The preset.
    in_features, out_features : int
    expert_dims : int or sequence of int
        Experts per level.
    budget : Budget, int, float or "same", default "same"
        See :func:`resolve_budget`; ``"same"`` matches ``nn.Linear``.
    bias : bool, default True
        Whether the layer (and the linear layer of a relative budget) has a bias.
    gates : bool, default True
        Count the gate projections in the layer's parameters.
    gate_bias : bool, default False
        With ``gates``: the gate has a bias too (:func:`gate_params`).
    expert_rank : int, default 4
        The fixed rank of bonds that touch expert cores (Tucker, TT, TR,
        TT-matrix).
    in_shape, out_shape : sequence of int, optional
        The legs of a split input and output (see :class:`~mumoe.spec.Network`).

    Returns
    -------
    int or tuple of int
        A ``rank`` for the preset (see the module table).

    Raises
    ------
    ValueError
        If even the free rank 1 does not fit the budget, or the network has
        no free bond (a TT-matrix with one pair of legs).

    Examples
    --------
    >>> match_rank("cp", 768, 1000, expert_dims=128)
    353
    >>> match_rank("tr", 768, 1000, expert_dims=128)
    (4, 4, 94)
    """
    record = FORMATS.get(format) if isinstance(format, str) else None
    if record is None or record.free_rank is None:
        ranked = [name for name, f in FORMATS.items() if f.free_rank is not None]
        raise ValueError(
            f"cannot match the rank of format {format!r}; choose one of "
            f"{', '.join(map(repr, ranked))}"
        )
    free_rank = record.free_rank
    dims = positive_ints(expert_dims, "expert_dims")
    fixed = positive_int(expert_rank, "expert_rank")

    if format == "ttm":
        in_shape, out_shape = ttm_shapes(in_features, out_features, in_shape, out_shape)
    shapes = {"in_shape": in_shape, "out_shape": out_shape}
    legs = [
        1 if shape is None else len(positive_ints(shape, name)) for name, shape in shapes.items()
    ]

    def rank_for(r: int) -> Rank:
        return free_rank(len(dims), fixed, r, *legs)

    target = resolve_budget(budget, in_features, out_features, bias)
    extra = gate_params(in_features, dims, gate_bias) if gates else 0

    def total(r: int) -> int:
        net = preset(
            format,
            in_features,
            out_features,
            expert_dims=dims,
            rank=rank_for(r),
            bias=bias,
            **shapes,
        )
        return net.n_params + extra

    if total(1) > target:
        raise ValueError(
            f"no {format} rank fits a budget of {target:,} parameters: at rank 1 the layer "
            f"already has {total(1):,} ({extra:,} of them the gate's); raise the budget "
            "or use fewer experts"
        )
    if total(2) == total(1):
        raise ValueError(
            f"the {format} network of these legs has no free bond to size (its bonds all touch "
            f"expert cores, fixed at expert_rank={fixed}); give its rank yourself"
        )
    low, high = 1, 2
    while total(high) <= target:
        low, high = high, high * 2
    while high - low > 1:  # total(low) fits, total(high) does not
        mid = (low + high) // 2
        low, high = (mid, high) if total(mid) <= target else (low, mid)
    return rank_for(low)
