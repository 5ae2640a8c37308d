r"""FLOP-optimal contraction paths: the default path search of every plan.

opt_einsum's ``"auto-hq"`` runs its exhaustive search only up to five
operands and dynamic programming without outer products above, which misses
the cheapest order of some μMoE networks: Tucker with two expert levels costs
1.0% more FLOPs at CLIP sizes and 8% more at small ones, with three levels
22% more (``python -m benchmarks.paths``).  Even opt_einsum's ``"optimal"``
returns a path 0.08% above the least ``opt_cost`` on CP with two levels at
CLIP sizes (checked against every pairwise path).  :func:`optimal_path`
finds the FLOP-optimal order exactly, by dynamic programming over subsets of operands:
the legs an intermediate keeps depend only on which operands it holds, so the
cheapest way to contract a subset :math:`S` is

.. math::
    c(S) = \min_{A \subset S} \; c(A) + c(S \setminus A)
    + \mathrm{flops}(A, S \setminus A),

with the cost of each pairwise step exactly as opt_einsum counts it
(``opt_einsum.helpers.flop_count``: the size of the legs involved, twice
that when a leg is summed).  Every binary contraction tree is considered,
outer products included, in :math:`O(3^n)` steps: milliseconds for the
eight operands of a Tucker network with two expert levels, about 50 ms for
ten (measured on one core; a plan is searched once and cached).  Above
:data:`OPTIMAL_OPERANDS` operands the search falls back to opt_einsum's
dynamic programming without outer products (as its ``"auto-hq"`` does up to 16
operands; random-greedy above), which is not guaranteed optimal, and is
exponential in the worst case: a complete graph of 14 cores searches for
minutes.  It stops at :data:`SEARCH_SECONDS` and keeps the best of
opt_einsum's random-greedy trials instead, with a warning.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import opt_einsum
from opt_einsum import paths as opt_paths
from opt_einsum.path_random import RandomGreedy
from opt_einsum.paths import PathOptimizer, ssa_to_linear

__all__ = [
    "DEFAULT_OPTIMIZE",
    "OPTIMAL_OPERANDS",
    "SEARCH_SECONDS",
    "FlopOptimal",
    "check_optimize",
    "optimal_path",
    "path_optimizer",
]

#: The most operands :func:`optimal_path` searches exhaustively (3^10 = 59,049
#: subset splits); networks with more use opt_einsum's ``"auto-hq"``.
OPTIMAL_OPERANDS = 10

#: The most seconds :class:`FlopOptimal` spends in the dynamic-programming search of
#: a network with more than :data:`OPTIMAL_OPERANDS` operands before it keeps a
#: random-greedy path instead.
SEARCH_SECONDS = 10.0

#: The most operands opt_einsum's ``"auto-hq"`` searches by dynamic programming.
_DP_OPERANDS = 16

#: The name of the default path search of new plans: :class:`FlopOptimal`.
DEFAULT_OPTIMIZE = "flop-optimal"


def optimal_path(
    inputs: Sequence[Collection[str]],
    output: Collection[str],
    size_dict: Mapping[str, int],
    memory_limit: int | None = None,
) -> list[tuple[int, ...]]:
    """The contraction path of least FLOPs, as opt_einsum counts them.

    The least ``opt_cost`` of ``opt_einsum.contract_path`` over every
    sequence of pairwise contractions, each operand that alone holds legs
    the output lacks summing them first in a step of its own where that is
    cheaper (no :class:`mumoe.Network` has such a leg: a bond joins two
    cores).  Ties are broken by the smaller largest intermediate, then by the
    first split found (deterministic).

    Parameters
    ----------
    inputs : sequence of collections of str
        The legs of each operand.
    output : collection of str
        The legs of the result.
    size_dict : mapping
        The size of every leg.
    memory_limit : int, optional
        The most entries any intermediate may hold (the result aside): the
        cheapest path within it.  None or a negative number: no limit.

    Returns
    -------
    list of tuple of int
        The path in opt_einsum's convention (positions in the working list).

    Raises
    ------
    ValueError
        If no pairwise path keeps every intermediate within ``memory_limit``
        (opt_einsum's ``"dp"`` raises too; its ``"optimal"`` ends the path
        with one einsum over the operands left).

    Examples
    --------
    >>> optimal_path(["ab", "bc", "cd"], "ad", {"a": 10, "b": 2, "c": 10, "d": 2})
    [(1, 2), (0, 1)]
    >>> optimal_path(["abc", "cd", "de"], "e", {"a": 9, "b": 9, "c": 9, "d": 9, "e": 9})
    [(0,), (0, 2), (0, 1)]
    """
    n = len(inputs)
    if n < 2:
        return [(0,)] if n == 1 else []
    if memory_limit is not None and memory_limit < 0:
        memory_limit = None  # opt_einsum's "no limit"
    limited, limit = memory_limit is not None, memory_limit or 0
    counts: dict[str, int] = {}
    for legs in (*inputs, output):
        for leg in set(legs):
            counts[leg] = counts.get(leg, 0) + 1
    # Legs as bits of an int, so that unions and differences are single operations.
    bit = {leg: 1 << k for k, leg in enumerate(sorted(counts))}
    legs_of = [sum(bit[leg] for leg in set(legs)) for legs in inputs]
    out = sum(bit[leg] for leg in set(output))
    sizes: dict[int, int] = {}

    def size(legs: int) -> int:
        if legs not in sizes:
            sizes[legs] = math.prod(size_dict[leg] for leg, b in bit.items() if legs & b)
        return sizes[legs]

    # An operand may first sum, in a step of its own, the legs it alone holds (those
    # vanish at its first pairwise step either way): its variants, (legs, flops).
    variants: list[list[tuple[int, int]]] = []
    for j, held in enumerate(legs_of):
        alone = sum(bit[leg] for leg in set(inputs[j]) if counts[leg] == 1)
        options = [(held, 0)]
        if alone and not (limited and size(held & ~alone) > limit):
            options.append((held & ~alone, 2 * size(held)))  # opt_einsum's single-term cost
        variants.append(options)

    full = (1 << n) - 1
    union = [0] * (full + 1)
    for mask in range(1, full + 1):
        low = mask & -mask
        union[mask] = union[mask ^ low] | legs_of[low.bit_length() - 1]
    keeps = [0] * (full + 1)
    for mask in range(1, full + 1):  # an intermediate keeps the legs still needed
        single = mask & (mask - 1) == 0  # one operand keeps all its legs
        keeps[mask] = union[mask] if single else union[mask] & (union[full ^ mask] | out)

    # The sides of a split with a choice, (legs, extra flops, summed alone first);
    # None elsewhere (the hot loop's common case).
    choices: list[list[tuple[int, int, bool]] | None] = [None] * (full + 1)
    for j, options in enumerate(variants):
        if len(options) > 1:
            choices[1 << j] = [(held, extra, k > 0) for k, (held, extra) in enumerate(options)]

    cost = [0] * (full + 1)  # -1: no path within the memory limit
    largest = [0] * (full + 1)
    split = [0] * (full + 1)
    choice: dict[int, tuple[bool, bool]] = {}
    for mask in sorted(range(1, full + 1), key=int.bit_count):
        if mask & (mask - 1) == 0:
            continue
        low = mask & -mask
        rest = mask ^ low
        kept = keeps[mask]
        best = (-1, 0, 0, (False, False))
        sub = rest
        too_big = limited and mask != full and size(kept) > limit
        while not too_big:  # every split (A, S \ A) with A holding the lowest operand
            left = low | sub
            right = mask ^ left
            if right and cost[left] >= 0 and cost[right] >= 0:
                if choices[left] is None and choices[right] is None:
                    involved = keeps[left] | keeps[right]
                    step = size(involved) * (2 if involved & ~kept else 1)
                    total = cost[left] + cost[right] + step
                    peak = max(largest[left], largest[right], size(kept))
                    if best[0] < 0 or (total, peak) < best[:2]:
                        best = (total, peak, left, (False, False))
                else:
                    for left_legs, left_extra, left_first in choices[left] or [
                        (keeps[left], 0, False)
                    ]:
                        for right_legs, right_extra, right_first in choices[right] or [
                            (keeps[right], 0, False)
                        ]:
                            involved = left_legs | right_legs
                            step = size(involved) * (2 if involved & ~kept else 1)
                            total = cost[left] + cost[right] + step + left_extra + right_extra
                            peak = max(largest[left], largest[right], size(kept))
                            if left_first or right_first:
                                peak = max(peak, size(left_legs), size(right_legs))
                            if best[0] < 0 or (total, peak) < best[:2]:
                                best = (total, peak, left, (left_first, right_first))
            if sub == 0:
                break
            sub = (sub - 1) & rest
        cost[mask], largest[mask], split[mask], choice[mask] = best

    if cost[full] < 0:
        raise ValueError(
            f"no pairwise contraction path keeps every intermediate within memory_limit="
            f"{memory_limit:,} entries; raise the limit, or use opt_einsum's 'optimal', "
            "which ends such a path with one einsum over the operands left"
        )
    ssa: list[tuple[int, ...]] = []

    def build(mask: int, first: bool = False) -> int:
        if mask & (mask - 1) == 0:
            if not first:
                return mask.bit_length() - 1
            ssa.append((mask.bit_length() - 1,))
            return n + len(ssa) - 1
        left_first, right_first = choice[mask]
        a = build(split[mask], left_first)
        b = build(mask ^ split[mask], right_first)
        ssa.append((a, b))
        return n + len(ssa) - 1

    build(full)
    return [tuple(int(i) for i in step) for step in ssa_to_linear(ssa)]


class FlopOptimal(PathOptimizer):
    """opt_einsum path optimiser: :func:`optimal_path` up to ``max_operands``, then bounded.

    A general optimiser, usable as ``optimize=`` of ``opt_einsum.contract``:
    legs one operand alone sums are summed first, and ``memory_limit`` (the
    most entries of an intermediate) is honoured by the exact search and the
    dynamic programming.  With more than ``max_operands`` operands, opt_einsum's
    dynamic programming (without outer products, up to 16 operands) runs for
    at most ``max_seconds``; past that, or with more operands, the best of 128
    random-greedy trials is kept (within ``max_seconds`` too), which is not
    guaranteed optimal: a ``UserWarning`` says so when the time ran out.

    Parameters
    ----------
    max_operands : int, default OPTIMAL_OPERANDS
        The most operands searched exactly (:math:`O(3^n)`).
    max_seconds : float, optional
        The time budget of the searches past ``max_operands``;
        :data:`SEARCH_SECONDS` by default.

    Attributes
    ----------
    search : str
        How the last path was found: ``"FLOP-optimal"``,
        ``"dynamic programming"`` or ``"random-greedy"`` (empty before a search).

    Examples
    --------
    >>> import opt_einsum
    >>> optimizer = FlopOptimal()
    >>> path, _ = opt_einsum.contract_path("ab,bc,cd->ad", (10, 2), (2, 10), (10, 2),
    ...                                    shapes=True, optimize=optimizer)
    >>> path, optimizer.search
    ([(1, 2), (0, 1)], 'FLOP-optimal')
    """

    def __init__(
        self, max_operands: int = OPTIMAL_OPERANDS, max_seconds: float | None = None
    ) -> None:
        if max_seconds is None:
            max_seconds = SEARCH_SECONDS
        if not (isinstance(max_seconds, int | float) and max_seconds > 0):
            raise ValueError(f"max_seconds must be a positive number, got {max_seconds!r}")
        self.max_operands = max_operands
        self.max_seconds = float(max_seconds)
        self.search = ""
        self.deadline: float | None = None

    def start_clock(self) -> None:
        """Make the searches from now on share one budget of ``max_seconds``.

        A plan searches twice where the cheapest path is over its memory
        budget: the second search gets the time the first left.

        Examples
        --------
        >>> optimizer = FlopOptimal(max_seconds=5)
        >>> optimizer.start_clock()
        >>> optimizer.deadline is not None
        True
        """
        self.deadline = time.perf_counter() + self.max_seconds

    def __call__(
        self,
        inputs: list[frozenset[str]],
        output: frozenset[str],
        size_dict: dict[str, int],
        memory_limit: int | None = None,
    ) -> Any:
        """The path for opt_einsum, within ``memory_limit`` entries per intermediate."""
        n = len(inputs)
        if n <= self.max_operands:
            self.search = "FLOP-optimal"
            return optimal_path(inputs, output, size_dict, memory_limit)
        deadline = self.deadline or time.perf_counter() + self.max_seconds
        if n <= _DP_OPERANDS:
            naive = n * math.prod(size_dict[leg] for leg in set().union(*inputs, output))
            bounded = _BoundedFlops(deadline, naive)
            try:
                path = opt_paths.DynamicProgramming(minimize=bounded)(
                    inputs, output, size_dict, memory_limit
                )
            except _OutOfTime:
                warnings.warn(
                    f"the dynamic-programming path search over {n} operands passed its "
                    f"{self.max_seconds:g} s budget; the path is the best of opt_einsum's "
                    "random-greedy trials and may cost more FLOPs than the optimum "
                    "(FlopOptimal(max_seconds=...) searches longer; an explicit path or "
                    "optimiser skips the search)",
                    UserWarning,
                    stacklevel=2,
                )
            except _NoPathFits:
                raise ValueError(
                    f"no pairwise contraction path keeps every intermediate within "
                    f"memory_limit={memory_limit:,} entries"
                ) from None
            else:
                self.search = "dynamic programming"
                return path
        self.search = "random-greedy"
        remaining = max(deadline - time.perf_counter(), 0.01 * self.max_seconds)
        return RandomGreedy(max_repeats=128, max_time=remaining)(
            inputs, output, size_dict, memory_limit
        )


class _OutOfTime(Exception):
    pass


class _NoPathFits(Exception):
    pass


class _BoundedFlops:
    """opt_einsum's dynamic-programming FLOP comparison, with a deadline.

    Passed as ``DynamicProgramming(minimize=...)``: called for every pair of
    sub-networks the search considers.  (A callable also turns off the search's
    own end when no path fits ``memory_limit``, which is restored here: the
    cost cap passing ``naive``, the most any path costs, ends the search.)
    """

    def __init__(self, deadline: float, naive: int) -> None:
        self.deadline = deadline
        self.naive = naive
        self.calls = 0
        self.cost_cap = 0

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        if not self.calls & 1023 and time.perf_counter() > self.deadline:
            raise _OutOfTime
        cost_cap = args[4]
        if cost_cap != self.cost_cap:
            # The cap grows after a sweep that found no path; a smaller one starts the
            # next disconnected sub-network.  A sweep past naive found none: none fits.
            if self.naive < self.cost_cap < cost_cap:
                raise _NoPathFits
            self.cost_cap = cost_cap
        opt_paths._dp_compare_flops(*args)


def path_optimizer(optimize: Any) -> Any:
    """What to hand opt_einsum for ``optimize``: :class:`FlopOptimal` for ``"flop-optimal"``.

    Parameters
    ----------
    optimize : str, path or PathOptimizer

    Returns
    -------
    str, path or PathOptimizer

    Examples
    --------
    >>> path_optimizer("flop-optimal").max_operands, path_optimizer("greedy")
    (10, 'greedy')
    """
    return FlopOptimal() if optimize == DEFAULT_OPTIMIZE else optimize


def check_optimize(optimize: Any, n_operands: int) -> Any:
    """Return ``optimize`` if a plan can be built with it, else raise, naming the options.

    Checked when a network is built, not at its first call.

    Parameters
    ----------
    optimize : str, PathOptimizer or path
        ``"flop-optimal"``, an opt_einsum optimiser name or instance, or an
        explicit pairwise path for ``n_operands`` operands.
    n_operands : int
        Operands of the forward contraction (gates, input, cores).

    Returns
    -------
    str, PathOptimizer or sequence
        ``optimize`` itself.

    Raises
    ------
    ValueError
        For an unknown name, or a path that does not contract ``n_operands``.
    TypeError
        For anything else.

    Examples
    --------
    >>> check_optimize("greedy", 4)
    'greedy'
    >>> check_optimize("gredy", 4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown path optimiser 'gredy'; choose 'flop-optimal' or one of opt_einsum's: ...
    """
    if isinstance(optimize, str):
        if optimize == DEFAULT_OPTIMIZE:
            return optimize
        try:
            opt_einsum.paths.get_path_fn(optimize)
        except KeyError:
            names = sorted(opt_einsum.paths._PATH_OPTIONS)
            raise ValueError(
                f"unknown path optimiser {optimize!r}; choose {DEFAULT_OPTIMIZE!r} or one of "
                f"opt_einsum's: {', '.join(map(repr, names))}"
            ) from None
        return optimize
    if isinstance(optimize, PathOptimizer):
        return optimize
    if isinstance(optimize, Sequence) and all(
        isinstance(step, Sequence) and all(isinstance(k, int) for k in step) for step in optimize
    ):
        path = tuple(tuple(step) for step in optimize)
        remaining = n_operands
        for step in path:
            if (
                not 1 <= len(step) <= 2
                or len(set(step)) != len(step)
                or not all(0 <= k < remaining for k in step)
            ):
                raise ValueError(
                    f"path step {step} does not contract positions of the {remaining} "
                    f"operands left (opt_einsum's path format)"
                )
            remaining -= len(step) - 1
        if remaining != 1:
            raise ValueError(
                f"the path leaves {remaining} operands of {n_operands}; "
                "it must contract them to one"
            )
        return optimize
    raise TypeError(
        f"optimize must be a path optimiser name, an opt_einsum PathOptimizer or an explicit "
        f"path (a sequence of position tuples), got {optimize!r}"
    )
