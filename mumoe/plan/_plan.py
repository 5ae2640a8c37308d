r"""Compiled contractions and the bounded cache that keeps them.

A :class:`Plan` is one einsum equation compiled for one set of operand
shapes: the path is searched once, when the plan is built, and its pairwise
steps compiled into matrix multiplies with fixed layouts
(:func:`~mumoe.plan.compile_program`); every call afterwards only executes
them.  Plans are stored in a :class:`PlanCache`, a small thread-safe LRU
keyed by plain tuples, one per :class:`~mumoe.plan.Planner`.

A compiled plan stays valid for operands whose sizes differ from the ones it
was built for, as long as their number of dimensions agrees.  A planner
uses that to key forward plans on a power-of-two *bucket* of the batch size
rather than on the exact size, so a data loader whose last batch is
smaller, or sequences of varying length, do not fill the cache.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import opt_einsum
import tensorly as tl
from opt_einsum import path_random
from opt_einsum import paths as opt_paths

from mumoe.backends import creation_context
from mumoe.plan._paths import DEFAULT_OPTIMIZE, FlopOptimal, path_optimizer
from mumoe.plan._program import Kernels, Program, compile_program
from mumoe.validation import positive_int

__all__ = [
    "BIAS_INSIDE_ROWS",
    "BIAS_KERNEL_ELEMENTS",
    "DEFAULT_OPTIMIZE",
    "Plan",
    "PlanCache",
    "PlanTooLargeError",
    "batch_bucket",
]
# DEFAULT_OPTIMIZE is mumoe.plan's, kept importable from here.


#: The bias rule.  Where a plan can add the bias inside the contraction
#: (``x @ core[:I] + core[I]``, no column of ones), it does so when no gradient
#: flows to the cores; when the backend declares a ``bias_matmul`` kernel (which
#: writes the core's gradient once and keeps no copy of ``x``) and ``x`` has at
#: least :data:`BIAS_KERNEL_ELEMENTS` entries; or when the batch has more than
#: this many rows per entry of the bias slice.  Otherwise ``z = [x, 1]`` is
#: formed.  Without the kernel, the two slices of the core each cost a
#: zero-filled gradient of the whole core in the backward pass, which only a
#: large batch repays against one copy of ``x``.
BIAS_INSIDE_ROWS = 2

#: The smallest input (rows x I) for which a ``bias_matmul`` kernel is used in
#: training: its backward runs in Python (about 0.1 ms a call on a 2-core CPU,
#: ``benchmarks/README.md``), which a copy of a smaller ``x`` undercuts.
BIAS_KERNEL_ELEMENTS = 1 << 16


_RANDOM_LOCK = threading.Lock()


@contextlib.contextmanager
def _private_random() -> Iterator[None]:
    # opt_einsum's random-greedy search (auto-hq past 20 operands, and an autotune
    # candidate) seeds and draws from Python's global random, which another thread may
    # be drawing from: give it a generator of its own while it searches (its paths are
    # the same, since it seeds each trial).
    # (It seeds with random_seed, draws with random_choices, and its cost jitter calls
    # opt_einsum.paths' random.gauss.)
    rng = random.Random()
    with _RANDOM_LOCK:
        saved = path_random.random_seed, path_random.random_choices, opt_paths.random
        path_random.random_seed, path_random.random_choices = rng.seed, rng.choices
        opt_paths.random = rng
        try:
            yield
        finally:
            path_random.random_seed, path_random.random_choices, opt_paths.random = saved


class PlanTooLargeError(MemoryError):
    """A contraction whose every path holds an intermediate over the memory limit.

    Raised when a plan is built, before anything is allocated.  A
    ``MemoryError``, so that code which retries smaller batches on running out
    of memory retries on it too.

    Parameters
    ----------
    message : str
    needed : int
        Entries of the largest intermediate of the path searched without the
        limit (the cheapest one where the search is exact).
    limit : int
        The most entries an intermediate was allowed.
    reason : str
        Why no other path was taken: none exists (the search was exhaustive),
        the search within its time budget found none, or the path was given.

    Examples
    --------
    >>> try:
    ...     Plan.build("ab,bc,ca->", [(100, 100)] * 3, memory_limit=1000)
    ... except PlanTooLargeError as error:
    ...     print(error.needed, error.limit, error.reason)
    10000 1000 no contraction order keeps within it
    """

    def __init__(self, message: str, *, needed: int, limit: int, reason: str) -> None:
        super().__init__(message)
        self.needed = needed
        self.limit = limit
        self.reason = reason


def batch_bucket(batch_size: int) -> int:
    """Return the power of two at or above ``batch_size`` (1 for an empty batch).

    Forward plans are keyed and path-searched at this size.

    Parameters
    ----------
    batch_size : int

    Returns
    -------
    int

    Examples
    --------
    >>> [batch_bucket(b) for b in (0, 1, 2, 3, 8, 9)]
    [1, 1, 2, 4, 8, 16]
    """
    return 1 if batch_size <= 1 else 1 << (batch_size - 1).bit_length()


@dataclass(frozen=True, eq=False)
class Plan:
    """An einsum equation compiled for one set of operand shapes.

    Built by :meth:`Plan.build` (and cached by :class:`mumoe.Network`), not by hand.

    Parameters
    ----------
    equation : str
        The einsum equation, in opt_einsum's symbols.
    shapes : tuple of tuple of int
        The operand shapes the path was searched for.
    path : tuple of tuple of int
        The pairwise contraction order (opt_einsum's path format).
    flops : int
        Floating-point operations of the path at ``shapes`` (a multiply-add
        counts as two).
    largest_intermediate : int
        Number of elements of the largest intermediate tensor at ``shapes``.
    step_equations : tuple of str
        The pairwise steps as opt_einsum writes them, one einsum each.
    program : mumoe.plan.Program
        The steps compiled to matrix multiplies with fixed layouts.
    bias_program : mumoe.plan.Program or None
        With ``bias_input``, the same path compiled to add the input's bias
        inside the contraction (``x`` without its column of ones); None where
        the path does not allow it.
    search : str
        How the path was found: ``"FLOP-optimal"``, ``"dynamic programming"``,
        ``"random-greedy"`` (:class:`~mumoe.plan.FlopOptimal`'s searches), an
        opt_einsum optimiser's name, or ``"explicit path"``; ``", within the
        memory limit"`` is added where the cheapest path held more.

    Examples
    --------
    >>> from mumoe import cp, planner_of
    >>> net = cp(8, 4, expert_dims=16, rank=3)
    >>> plan = planner_of(net).forward(16, "numpy", "float64")  # batch 16
    >>> plan.equation, plan.path, plan.flops
    ('ab,ac,be,ce,de->ad', ((0, 2), (0, 1), (1, 2), (0, 1)), 2832)
    >>> [step.kind for step in plan.program.steps]
    ['matmul', 'matmul', 'hadamard', 'matmul']
    """

    equation: str
    shapes: tuple[tuple[int, ...], ...]
    path: tuple[tuple[int, ...], ...]
    flops: int
    largest_intermediate: int
    step_equations: tuple[str, ...]
    program: Program
    bias_program: Program | None = None
    search: str = ""

    @classmethod
    def build(
        cls,
        equation: str,
        shapes: Sequence[Sequence[int]],
        optimize: str | Sequence[tuple[int, ...]] = DEFAULT_OPTIMIZE,
        *,
        lead: str | None = None,
        bias_input: int | None = None,
        kernels: Kernels | None = None,
        memory_limit: int | None = None,
    ) -> Plan:
        """Search a contraction path and compile it.

        Parameters
        ----------
        equation : str
            An einsum equation with an explicit output (``"...->..."``), one
            character per leg.
        shapes : sequence of shapes
            The operand shapes to optimise for.
        optimize : str or path, default "flop-optimal"
            ``"flop-optimal"`` (:class:`mumoe.plan.FlopOptimal`), any
            optimiser opt_einsum accepts, or an explicit path.
        lead : str, optional
            A leg to keep leading in every intermediate (the batch rows).
        bias_input : int, optional
            Position of an input operand ``(lead, i)`` that may come without
            its bias column: see :func:`mumoe.plan.compile_program`.
        kernels : mumoe.plan.Kernels, optional
            The backend's own kernels for the compiled steps.
        memory_limit : int, optional
            The most entries any intermediate may hold (the result aside,
            which exists anyway).  The cheapest path is kept if it fits;
            otherwise the path is searched again within the limit (more FLOPs).

        Returns
        -------
        Plan

        Raises
        ------
        PlanTooLargeError
            If no path (or the explicit one) keeps every intermediate within
            ``memory_limit``; nothing has been allocated.

        Examples
        --------
        >>> plan = Plan.build("ab,bc->ac", [(4, 3), (3, 2)])
        >>> plan.path, plan.flops, plan.largest_intermediate
        (((0, 1),), 48, 8)
        >>> Plan.build("ab,bc,ca->", [(100, 100)] * 3, memory_limit=1000)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mumoe.plan._plan.PlanTooLargeError: ... 10,000 entries, ...: no contraction order keeps ...
        """
        dims = tuple(tuple(int(d) for d in s) for s in shapes)
        optimizer = path_optimizer(optimize)
        if isinstance(optimizer, FlopOptimal):
            optimizer.start_clock()
        path, info, search = _search(equation, dims, optimizer, None)
        if memory_limit is not None:
            inputs, output = equation.split("->")
            legs = dict(zip("".join(inputs.split(",")), (d for s in dims for d in s), strict=True))
            memory_limit = max(memory_limit, math.prod(legs[leg] for leg in output))
        if memory_limit is not None and info.largest_intermediate > memory_limit:
            needed = int(info.largest_intermediate)
            if search == "explicit path":
                reason = "the path given holds more"
            else:
                reason = "no contraction order keeps within it"  # an exhaustive search said so
                try:
                    path, info, search = _search(equation, dims, optimizer, memory_limit)
                except (ValueError, RuntimeError):  # opt_einsum's dp: RuntimeError
                    pass
                else:
                    reason = f"the {search} search found no path within it"
            if info.largest_intermediate > memory_limit:
                raise PlanTooLargeError(
                    f"the contraction {equation} holds an intermediate of {needed:,} entries, "
                    f"over the memory limit of {memory_limit:,}: {reason}",
                    needed=needed,
                    limit=memory_limit,
                    reason=reason,
                )
            search += ", within the memory limit"
        inputs, output = equation.split("->")
        terms = inputs.split(",")
        sizes = {
            leg: d
            for term, shape in zip(terms, dims, strict=True)
            for leg, d in zip(term, shape, strict=True)
        }
        program = compile_program(terms, output, path, sizes, lead=lead, kernels=kernels)
        bias_program = None
        if bias_input is not None:
            candidate = compile_program(
                terms, output, path, sizes, lead=lead, bias_input=bias_input, kernels=kernels
            )
            bias_program = candidate if candidate.bias_inside else None
        return cls(
            equation=equation,
            shapes=dims,
            path=tuple(tuple(step) for step in path),
            flops=int(info.opt_cost),
            largest_intermediate=int(info.largest_intermediate),
            step_equations=tuple(step[2] for step in info.contraction_list),
            program=program,
            bias_program=bias_program,
            search=search,
        )

    def bias_inside(self, batch_size: int, differentiable: bool) -> bool:
        """Whether a call adds the bias inside the contraction: the bias rule.

        True where :attr:`bias_program` exists and either no gradient flows
        to the cores, the backend declares a ``bias_matmul`` kernel and the
        input has at least :data:`BIAS_KERNEL_ELEMENTS` entries, or the
        batch has more than :data:`BIAS_INSIDE_ROWS` rows per entry of the
        bias slice.

        Parameters
        ----------
        batch_size : int
            Rows of the call.
        differentiable : bool
            Whether gradients flow to the cores.

        Returns
        -------
        bool

        Examples
        --------
        >>> from mumoe import cp, planner_of
        >>> plan = planner_of(cp(5, 2, expert_dims=8, rank=3)).forward(4, "numpy", "float64")
        >>> plan.bias_inside(4, differentiable=False), plan.bias_inside(4, differentiable=True)
        (True, False)
        """
        program = self.bias_program
        return program is not None and (
            not differentiable
            or batch_size > BIAS_INSIDE_ROWS * program.bias_width
            or (
                program.kernels.bias_matmul is not None
                and batch_size * program.bias_features >= BIAS_KERNEL_ELEMENTS
            )
        )

    def run(
        self,
        before: Sequence[Any],
        x: Any,
        after: Sequence[Any],
        *,
        bias: bool,
        differentiable: bool,
    ) -> Any:
        """One call of the forward contraction, the bias rule applied.

        The bias is added inside the contraction where :meth:`bias_inside`
        says so; otherwise ``z = [x, 1]`` is formed (with a bias) and the plain
        program runs.

        Parameters
        ----------
        before : sequence of arrays
            The operands before the input (the gates).
        x : array, shape (B, I)
            The input, without its column of ones.
        after : sequence of arrays
            The operands after it (the cores).
        bias : bool
            Whether the input leg has a bias slice (``Network.bias``).
        differentiable : bool
            Whether gradients flow to the cores.

        Returns
        -------
        array, shape (B, O)

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp, planner_of, random_cores
        >>> net = cp(5, 2, expert_dims=8, rank=3)
        >>> plan = planner_of(net).forward(4, "numpy", "float64")
        >>> plan.run([np.ones((4, 8))], np.ones((4, 5)), random_cores(net), bias=True,
        ...          differentiable=True).shape
        (4, 2)
        """
        rows = x.shape[0]
        if self.bias_inside(rows, differentiable):
            return self.bias_program((*before, x, *after))  # type: ignore[misc]
        if not bias:
            return self.program((*before, x, *after))
        ones = tl.ones((rows, 1), **creation_context(x))
        return self.program((*before, tl.concatenate([x, ones], axis=1), *after))

    def __call__(self, *operands: Any, bias_inside: bool = False) -> Any:
        """Contract ``operands`` (arrays of one backend) along the compiled path.

        With ``bias_inside``, the input comes without its column of ones and
        :attr:`bias_program` runs (it must exist).
        """
        return (self.bias_program if bias_inside else self.program)(operands)  # type: ignore[misc]


def _search(
    equation: str, dims: tuple[tuple[int, ...], ...], optimizer: Any, memory_limit: int | None
) -> tuple[Any, Any, str]:
    # One path search: the path, opt_einsum's PathInfo, and how it was found.
    with _private_random():
        path, info = opt_einsum.contract_path(
            equation, *dims, shapes=True, optimize=optimizer, memory_limit=memory_limit
        )
    if isinstance(optimizer, FlopOptimal):
        search = optimizer.search
    elif isinstance(optimizer, str):
        search = f"opt_einsum {optimizer!r}"
    elif isinstance(optimizer, opt_paths.PathOptimizer):
        search = type(optimizer).__name__
    else:
        search = "explicit path"
    return path, info, search


class PlanCache:
    """A bounded, thread-safe least-recently-used cache of plans.

    Parameters
    ----------
    maxsize : int, default 32
        The most plans kept; the least recently used one is dropped first.

    Notes
    -----
    Keys are plain tuples such as ``("forward", 256, "pytorch", torch.float32)``,
    never formatted strings or hash values.  A hit takes no lock (each
    dictionary operation is atomic).  A plan is built outside the lock,
    so a slow path search does not stall other threads; if two threads build
    the same plan at once, the first one stored wins and both use it.

    Examples
    --------
    >>> cache = PlanCache(maxsize=2)
    >>> cache.get(("a",), lambda: "plan a"), cache.get(("a",), lambda: "never built")
    ('plan a', 'plan a')
    >>> cache
    PlanCache(size=1, maxsize=2, hits=1, misses=1)
    """

    def __init__(self, maxsize: int = 32) -> None:
        self.maxsize = positive_int(maxsize, "maxsize")
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Plan]) -> Plan:
        """Return the plan stored under ``key``, building and storing it if absent.

        Parameters
        ----------
        key : hashable
        build : callable
            Called without arguments, outside the lock, on a miss.

        Returns
        -------
        Plan

        Examples
        --------
        >>> cache = PlanCache(maxsize=1)
        >>> cache.get("a", lambda: "plan a"), cache.get("b", lambda: "plan b"), cache.keys()
        ('plan a', 'plan b', ['b'])
        """
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                self.hits += 1
                return plan
            self.misses += 1
        plan = build()
        with self._lock:
            plan = self._plans.setdefault(key, plan)
            self._plans.move_to_end(key)
            while len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)
        return plan

    def hit(self, key: Hashable) -> Plan | None:
        """The plan stored under ``key``, counted as a hit and made most recent; or None.

        A miss is not counted: :meth:`get` counts it when it builds the plan.

        Parameters
        ----------
        key : hashable

        Returns
        -------
        Plan or None

        Examples
        --------
        >>> cache = PlanCache()
        >>> _ = cache.get("a", lambda: "plan a")
        >>> cache.hit("a"), cache.hit("b"), (cache.hits, cache.misses)
        ('plan a', None, (1, 1))
        """
        # Lock-free, the hot path of every call (and traceable by torch.compile, which
        # cannot enter a lock): each OrderedDict operation is atomic, and a plan evicted
        # by another thread between the two is still a plan.  The hit count may miss a
        # concurrent increment; it is a statistic.
        plans = self._plans
        plan = plans.get(key)
        if plan is not None:
            with contextlib.suppress(KeyError):
                plans.move_to_end(key)
            self.hits += 1
        return plan

    def peek(self, key: Hashable) -> Plan | None:
        """The plan stored under ``key``, or None; neither counted nor moved.

        Parameters
        ----------
        key : hashable

        Returns
        -------
        Plan or None

        Examples
        --------
        >>> cache = PlanCache()
        >>> _ = cache.get("a", lambda: "plan a")
        >>> cache.peek("a"), cache.peek("b"), cache.hits
        ('plan a', None, 0)
        """
        with self._lock:
            return self._plans.get(key)

    def keys(self) -> list[Hashable]:
        """The keys held, least recently used first.

        Returns
        -------
        list

        Examples
        --------
        >>> cache = PlanCache()
        >>> for key in ("a", "b", "a"):
        ...     _ = cache.get(key, lambda: key)
        >>> cache.keys()
        ['b', 'a']
        """
        with self._lock:
            return list(self._plans)

    def clear(self) -> None:
        """Drop every plan and reset the hit and miss counters.

        Examples
        --------
        >>> cache = PlanCache()
        >>> _ = cache.get("key", lambda: "plan")
        >>> cache.clear()
        >>> cache
        PlanCache(size=0, maxsize=32, hits=0, misses=0)
        """
        with self._lock:
            self._plans.clear()
            self.hits = 0
            self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)

    def __repr__(self) -> str:
        return (
            f"PlanCache(size={len(self)}, maxsize={self.maxsize}, "
            f"hits={self.hits}, misses={self.misses})"
        )
