"""The rank validators of the formats: a user's ``rank`` checked and normalised.

Ranks follow TensorLy's conventions (``validate_tt_rank``, ``validate_tr_rank``):
TT and TR ranks are given either as one int or as the full tuple of
:math:`d + 1` bond sizes; the shorter tuple of only the bonds actually
present is accepted too.  Unlike TensorLy's, every validator refuses a rank
of 0, and a message names what was expected and what came.  Each record of
:data:`mumoe.spec.FORMATS` calls its validator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mumoe.typing import Rank
from mumoe.validation import positive_int

__all__ = ["validate_cp_rank", "validate_tr_rank", "validate_tt_rank", "validate_tucker_rank"]


def _rank_tuple(rank: Rank, name: str) -> tuple[int, ...]:
    if isinstance(rank, Sequence) and not isinstance(rank, str):
        return tuple(positive_int(r, f"{name} rank[{k}]") for k, r in enumerate(rank))
    raise TypeError(f"{name} rank must be an int or a sequence of ints, got {rank!r}")


def _is_sequence(rank: Any) -> bool:
    return isinstance(rank, Sequence) and not isinstance(rank, str)


def validate_cp_rank(rank: Rank) -> int:
    """Return a CP rank as a positive int.

    Parameters
    ----------
    rank : int

    Returns
    -------
    int

    Raises
    ------
    TypeError
        If ``rank`` is a sequence, a bool or not an integer.
    ValueError
        If ``rank`` is not positive.

    Examples
    --------
    >>> validate_cp_rank(8)
    8
    """
    if _is_sequence(rank):
        raise TypeError(f"a CP rank is one positive int, got the sequence {rank!r}")
    return positive_int(rank, "CP rank")


def validate_tucker_rank(rank: Rank, n_modes: int) -> tuple[int, ...]:
    """Return Tucker ranks as one positive int per mode.

    Parameters
    ----------
    rank : int or sequence of int
        One rank for all modes, or ``n_modes`` ranks (experts..., input, output).
    n_modes : int
        :math:`d = E + 2`.

    Returns
    -------
    tuple of int
        ``n_modes`` ranks.

    Raises
    ------
    ValueError
        If a sequence has the wrong length or a rank is not positive.

    Examples
    --------
    >>> validate_tucker_rank(4, 3)
    (4, 4, 4)
    """
    if not _is_sequence(rank):
        return (positive_int(rank, "Tucker rank"),) * n_modes
    ranks = _rank_tuple(rank, "Tucker")
    if len(ranks) != n_modes:
        raise ValueError(
            f"Tucker rank needs one entry per mode ({n_modes}: experts..., input, output), "
            f"got {len(ranks)}: {ranks}"
        )
    return ranks


def validate_tt_rank(rank: Rank, n_modes: int) -> tuple[int, ...]:
    """Return TT ranks as TensorLy's full tuple ``(1, R_1, ..., R_{d-1}, 1)``.

    Parameters
    ----------
    rank : int or sequence of int
        One rank for every inner bond; the ``d - 1`` inner ranks; or the full
        ``d + 1`` ranks whose first and last entries must be 1.
    n_modes : int
        :math:`d = E + 2`.

    Returns
    -------
    tuple of int
        ``n_modes + 1`` ranks, 1 at both ends.

    Raises
    ------
    ValueError
        If the sequence has the wrong length, a boundary rank is not 1, or a
        rank is not positive.

    Examples
    --------
    >>> validate_tt_rank(3, 3)
    (1, 3, 3, 1)
    >>> validate_tt_rank((2, 5), 3)
    (1, 2, 5, 1)
    """
    if not _is_sequence(rank):
        return (1, *(positive_int(rank, "TT rank"),) * (n_modes - 1), 1)
    ranks = _rank_tuple(rank, "TT")
    if len(ranks) == n_modes - 1:
        return (1, *ranks, 1)
    if len(ranks) != n_modes + 1:
        raise ValueError(
            f"TT rank for {n_modes} modes needs {n_modes - 1} inner ranks or {n_modes + 1} "
            f"ranks with boundary 1s, got {len(ranks)}: {ranks}"
        )
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(
            f"TT boundary ranks must be 1: rank[0]={ranks[0]}, rank[-1]={ranks[-1]}; "
            "for a closed chain use the 'tr' format"
        )
    return ranks


def validate_tr_rank(rank: Rank, n_modes: int) -> tuple[int, ...]:
    """Return TR ranks as TensorLy's full tuple ``(R_0, R_1, ..., R_{d-1}, R_0)``.

    Parameters
    ----------
    rank : int or sequence of int
        One rank for every bond; the ``d`` bond ranks ``R_0 ... R_{d-1}``; or the
        full ``d + 1`` ranks whose last entry must equal the first.
    n_modes : int
        :math:`d = E + 2`.

    Returns
    -------
    tuple of int
        ``n_modes + 1`` ranks, the last equal to the first.

    Raises
    ------
    ValueError
        If the sequence has the wrong length, the ring does not close, or a rank
        is not positive.

    Examples
    --------
    >>> validate_tr_rank(3, 3)
    (3, 3, 3, 3)
    >>> validate_tr_rank((2, 4, 5), 3)
    (2, 4, 5, 2)
    """
    if not _is_sequence(rank):
        return (positive_int(rank, "TR rank"),) * (n_modes + 1)
    ranks = _rank_tuple(rank, "TR")
    if len(ranks) == n_modes:
        return (*ranks, ranks[0])
    if len(ranks) != n_modes + 1:
        raise ValueError(
            f"TR rank for {n_modes} modes needs {n_modes} bond ranks or {n_modes + 1} ranks "
            f"closing the ring, got {len(ranks)}: {ranks}"
        )
    if ranks[-1] != ranks[0]:
        raise ValueError(
            f"TR ranks must close the ring: rank[-1]={ranks[-1]} != rank[0]={ranks[0]}"
        )
    return ranks
