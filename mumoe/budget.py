r"""The parameter-budget solver: choose the rank of a format to fit a parameter budget.

The paper compares μMoE layers with the linear layers they replace at equal
parameter count: the rank is the largest one whose layer (the factorised
weights plus, by default, the gate projections :math:`G_e \in
\mathbb{R}^{I \times N_e}`) has no more parameters than the budget.

One integer :math:`r` is free per format, as in the paper's experiments
(each format's ``free_rank`` hook in :data:`mumoe.formats.FORMATS`):

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

from collections.abc import Sequence

from mumoe.formats import FORMATS
from mumoe.presets import preset
from mumoe.typing import Rank
from mumoe.validation import positive_int, positive_ints

__all__ = ["gate_params", "linear_params", "match_rank", "resolve_budget"]


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


def gate_params(in_features: int, expert_dims: int | Sequence[int]) -> int:
    r"""Parameters of the gate projections, :math:`I \sum_e N_e`.

    Parameters
    ----------
    in_features : int
        :math:`I`.
    expert_dims : int or sequence of int
        :math:`N_1, \dots, N_E`.

    Returns
    -------
    int

    Examples
    --------
    >>> gate_params(768, (32, 4))
    27648
    """
    return in_features * sum(positive_ints(expert_dims, "expert_dims"))


def resolve_budget(
    budget: int | float | str, in_features: int, out_features: int, bias: bool
) -> int:
    """A parameter budget as a count.

    Parameters
    ----------
    budget : int, float or "same"
        ``"same"``: as many parameters as the linear layer of the same sizes;
        a float: that fraction of it; an int: a parameter count.
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
    linear = linear_params(in_features, out_features, bias)
    if budget == "same":
        return linear
    if isinstance(budget, float):
        if not budget > 0:
            raise ValueError(f"a fractional budget must be positive, got {budget}")
        return int(budget * linear)
    if isinstance(budget, str):
        raise ValueError(f"budget must be 'same', a float or an int, got {budget!r}")
    return positive_int(budget, "budget")


def match_rank(
    format: str,
    expert_dims: int | Sequence[int],
    in_features: int,
    out_features: int,
    *,
    budget: int | float | str = "same",
    bias: bool = True,
    gates: bool = True,
    expert_rank: int = 4,
) -> Rank:
    """The largest rank of a preset whose layer fits a parameter budget.

    Parameters
    ----------
    format : {"cp", "tucker", "tt", "tr"}
        The preset.
    expert_dims : int or sequence of int
        Experts per level.
    in_features, out_features : int
    budget : int, float or "same", default "same"
        See :func:`resolve_budget`; ``"same"`` matches ``nn.Linear``.
    bias : bool, default True
        Whether the layer (and the linear layer of a relative budget) has a bias.
    gates : bool, default True
        Count the gate projections in the layer's parameters.
    expert_rank : int, default 4
        The fixed rank of bonds that touch expert cores (Tucker, TT, TR).

    Returns
    -------
    int or tuple of int
        A ``rank`` for the preset (see the module table).

    Raises
    ------
    ValueError
        If even the free rank 1 does not fit the budget.

    Examples
    --------
    >>> match_rank("cp", 128, 768, 1000)
    353
    >>> match_rank("tr", 128, 768, 1000)
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

    def rank_for(r: int) -> Rank:
        return free_rank(len(dims), fixed, r)

    target = resolve_budget(budget, in_features, out_features, bias)
    extra = gate_params(in_features, dims) if gates else 0

    def total(r: int) -> int:
        net = preset(format, dims, in_features, out_features, rank=rank_for(r), bias=bias)
        return net.n_params + extra

    if total(1) > target:
        raise ValueError(
            f"no {format} rank fits a budget of {target:,} parameters: at rank 1 the layer "
            f"already has {total(1):,} ({extra:,} of them gate projections); raise the budget "
            "or use fewer experts"
        )
    low, high = 1, 2
    while total(high) <= target:
        low, high = high, high * 2
    while high - low > 1:  # total(low) fits, total(high) does not
        mid = (low + high) // 2
        low, high = (mid, high) if total(mid) <= target else (low, mid)
    return rank_for(low)
