"""Balanced splits of a feature size into the sizes of several legs.

A network that splits its input or output into legs ``i1 ... iK`` needs
their sizes (``in_shape``); :func:`balanced_shape` proposes the most
balanced one, as tensorly-torch's ``get_tensorized_shape`` does for its
tensorized layers.
"""

from __future__ import annotations

import functools
import math

from mumoe.validation import positive_int

__all__ = ["balanced_shape"]


@functools.lru_cache(maxsize=1024)
def _divisors(size: int) -> tuple[int, ...]:
    small = [d for d in range(1, math.isqrt(size) + 1) if size % d == 0]
    return tuple(sorted({*small, *(size // d for d in small)}))


@functools.lru_cache(maxsize=4096)
def _best_split(rest: int, legs: int, cap: int) -> tuple[int, ...] | None:
    # The best non-increasing split of rest into legs factors, each at most cap
    # (memoised: the same remainders recur down the search).
    if legs == 1:
        return (rest,) if rest <= cap else None
    best: tuple[int, ...] | None = None
    for first in _divisors(rest):
        if first > cap or first**legs < rest:
            continue
        tail = _best_split(rest // first, legs - 1, first)
        if tail is not None and (best is None or (first, *tail) < best):
            best = (first, *tail)
    return best


def balanced_shape(size: int, n_legs: int, *, strict: bool = True) -> tuple[int, ...]:
    """The most balanced sizes of ``n_legs`` legs whose product is ``size``.

    Among the ways to write ``size`` as a product of ``n_legs`` integers,
    the one whose largest factor is smallest (then whose second largest
    is, and so on), largest first: the first leg, which a split input's
    bias slice extends, is the largest.

    Parameters
    ----------
    size : int
        The input or output size, e.g. ``in_features``.
    n_legs : int
        How many legs to split it into.
    strict : bool, default True
        Refuse a split with legs of size 1 where ``size >= 2 ** n_legs``;
        with False, return it (``balanced_shape(7, 2, strict=False)`` is
        ``(7, 1)``).

    Returns
    -------
    tuple of int
        Non-increasing sizes multiplying to ``size``.

    Raises
    ------
    ValueError
        If ``size`` or ``n_legs`` is not positive, or, with ``strict``,
        ``size`` has no split into ``n_legs`` factors above 1 when
        ``size >= 2 ** n_legs`` would allow one (a prime ``size`` splits
        only as ``(size, 1, ...)``).

    Examples
    --------
    >>> balanced_shape(768, 2), balanced_shape(768, 3), balanced_shape(1000, 3)
    ((32, 24), (12, 8, 8), (10, 10, 10))
    >>> balanced_shape(7, 2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: 7 cannot be split into 2 legs of sizes above 1 (7 is prime); ...
    """
    size = positive_int(size, "size")
    n_legs = positive_int(n_legs, "n_legs")
    found = _best_split(size, n_legs, size)
    assert found is not None  # (size, 1, ..., 1) always qualifies
    if strict and n_legs > 1 and found[-1] == 1 and size >= 2**n_legs:
        why = f"{size} is prime" if len(_divisors(size)) == 2 else "too few factors"
        raise ValueError(
            f"{size} cannot be split into {n_legs} legs of sizes above 1 ({why}); choose "
            f"in_shape/out_shape yourself, e.g. ({size}, {', '.join(['1'] * (n_legs - 1))}), "
            "or split fewer legs"
        )
    return found
