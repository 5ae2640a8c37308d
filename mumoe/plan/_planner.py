r"""The plans of one network: which contractions it compiles, how, and where they are kept.

A :class:`Planner` serves one :class:`~mumoe.spec.Network` and holds its
planning policy (the path optimiser, autotuning) and its bounded cache of
compiled :class:`~mumoe.plan.Plan` s: the forward contraction per batch
bucket, backend and dtype, the contraction of all cores into ``W``, and that
of one expert's matrix.  :meth:`Planner.chosen` is the plan a forward pass
uses, which :func:`flops` and :func:`~mumoe.plan.describe` report.

Networks are values: the planners live beside them, in a bounded,
thread-safe map keyed by the network and the policy (:func:`planner_of`),
so that equal networks share their plans and a function call with a
network finds its planner in one dictionary lookup.  Layers hold theirs.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import opt_einsum

from mumoe.backends import declared_backend, sparse_crossover, sparse_min_work
from mumoe.plan._paths import DEFAULT_OPTIMIZE, check_optimize
from mumoe.plan._plan import Plan, PlanCache, PlanTooLargeError, batch_bucket
from mumoe.plan._program import backend_kernels
from mumoe.plan._sizes import bytes_text, dtype_text, itemsize, short_name
from mumoe.plan._sparse import SparseLayout, check_crossover, expert_widths, sparse_layout
from mumoe.spec import Network
from mumoe.validation import check_bool, positive_int

__all__ = [
    "AUTOTUNE_OPTIMIZERS",
    "MEMORY_LIMIT",
    "PLANNERS_KEPT",
    "Planner",
    "flops",
    "planner_of",
    "resolve_planner",
]

#: The opt_einsum optimisers whose paths autotuning times, besides the network's own.
AUTOTUNE_OPTIMIZERS = ("greedy", "branch-2", "dp", "random-greedy-128")

#: The default memory budget of a plan: the most bytes one intermediate of a
#: contraction may hold (2 GiB), though never less than its largest operand or
#: its result, which exist anyway.
MEMORY_LIMIT = 1 << 31


class Planner:
    """The compiled plans of one network and the policy that builds them.

    Made by :func:`planner_of`, which keeps one per network and policy;
    build one directly for a cache of its own.

    Parameters
    ----------
    network : Network
    optimize : str or path, default "flop-optimal"
        The path search used when a plan is first built: ``"flop-optimal"``
        (the least FLOPs, exactly, up to :data:`~mumoe.plan.OPTIMAL_OPERANDS`
        operands; opt_einsum's ``"auto-hq"`` above), any opt_einsum
        optimiser, or an explicit path (opt_einsum's format) for the forward
        contraction of ``(*gates, x, *cores)``; the other contractions then
        use "flop-optimal".
    cache_size : int, default 32
        The most plans kept.
    autotune : bool, default False
        Time the candidate paths of :data:`AUTOTUNE_OPTIMIZERS` on the first
        forward call per batch bucket, backend and dtype; keep the fastest.
        Candidates over ``memory_limit`` are not timed.
    memory_limit : int or None, default MEMORY_LIMIT
        The memory budget of every plan: the most bytes one intermediate may
        hold, at the operands' dtype (8 bytes an entry where it is not known),
        though never less than the largest operand or the result.  The
        cheapest path is kept where it fits; otherwise the cheapest path within
        the budget, and where none fits, building the plan raises
        :class:`~mumoe.plan.PlanTooLargeError` before anything is allocated.
        None: no budget.
    crossover : float, optional
        The largest support density ``k / N_e`` at which a level given as a
        support (:class:`~mumoe.typing.SparseGate`) is contracted sparsely,
        by gathering ``k`` rows of its core; a wider one is made dense
        first.  The layers' gates also hand a level over as its support only
        up to this density.  By default each backend's measured crossover
        (:func:`mumoe.backends.sparse_crossover`); 0: always dense; 1: sparse
        whenever a support is given.

    Raises
    ------
    ValueError, TypeError
        For an optimiser no plan can be built with, a flag that is not a bool,
        a budget that is not a positive integer, or a crossover that is not a
        number from 0 to 1.

    Examples
    --------
    >>> from mumoe import cp
    >>> planner = Planner(cp(5, 2, expert_dims=8, rank=3))
    >>> planner.forward(100, "numpy", "float64") is planner.forward(70, "numpy", "float64")
    True
    """

    def __init__(
        self,
        network: Network,
        *,
        optimize: str | Sequence[tuple[int, ...]] = DEFAULT_OPTIMIZE,
        cache_size: int = 32,
        autotune: bool = False,
        memory_limit: int | None = MEMORY_LIMIT,
        crossover: float | None = None,
    ) -> None:
        if not isinstance(network, Network):
            raise TypeError(f"a Planner plans a mumoe.Network, got {type(network).__qualname__}")
        self.network = network
        n_operands = network.n_levels + 1 + network.n_cores  # gates, input, cores
        self.optimize = check_optimize(optimize, n_operands)
        self.autotune = check_bool(autotune, "autotune")
        if memory_limit is not None:
            memory_limit = positive_int(memory_limit, "memory_limit")
        self.memory_limit = memory_limit
        self.crossover = check_crossover(crossover)
        self.cache = PlanCache(cache_size)

    def __repr__(self) -> str:
        crossover = "" if self.crossover is None else f", crossover={self.crossover}"
        return (
            f"Planner(optimize={self.optimize!r}, autotune={self.autotune}, "
            f"memory_limit={self.memory_limit!r}{crossover}, cache={self.cache})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (with a layer that holds it) as its policy; plans are built again.
        policy = (
            self.optimize,
            self.cache.maxsize,
            self.autotune,
            self.memory_limit,
            self.crossover,
        )
        return (_unpickle, (self.network, *policy))

    # ------------------------------------------------------------------ sparse

    def max_density(
        self,
        backend: str,
        training: bool = False,
        batch_size: int | None = None,
        sparsified: bool = False,
    ) -> float:
        """The widest support, as a share of a level, contracted sparsely on ``backend``.

        This planner's ``crossover`` where it has one, else the backend's
        declared one (:func:`mumoe.backends.sparse_crossover`); with
        ``batch_size``, 0 where no level is worth a gather
        (:meth:`worth_gathering`): the layers' gates then stay dense.

        Parameters
        ----------
        backend : str
        training : bool, default False
            Whether gradients flow to the cores (a crossover for each case).
        batch_size : int, optional
            The rows of the call.
        sparsified : bool, default False
            Whether the gate selects its support from dense coefficients
            (entmax-1.5, sparsemax): then 0 unless some level's expert cores
            hold the backend's ``sparsify_min_width`` entries per expert.

        Returns
        -------
        float

        Examples
        --------
        >>> from mumoe import cp
        >>> Planner(cp(5, 2, expert_dims=8, rank=3), crossover=0.5).max_density("numpy")
        0.5
        """
        if self.crossover is not None:
            return self.crossover
        levels = list(range(self.network.n_levels))
        if batch_size is not None:
            levels = [e for e in levels if self.worth_gathering(e, batch_size, backend, training)]
        if sparsified:
            widths = expert_widths(self.network)
            declaration = declared_backend(backend)
            floor = 0 if declaration is None else declaration.sparsify_min_width
            levels = [e for e in levels if widths[e] >= floor]
        return sparse_crossover(backend, training) if levels else 0.0

    def worth_gathering(
        self, level: int, batch_size: int, backend: str, training: bool = False
    ) -> bool:
        """Whether ``level``'s dense step is large enough to be replaced by a gather.

        Its multiply-adds, ``B * N_e`` times the entries per expert of the
        cores holding the leg (:func:`mumoe.plan.expert_widths`), against the
        backend's ``sparse_min_work`` (:func:`mumoe.backends.sparse_min_work`):
        below it, a gather's fixed per-call cost outweighs what it saves.  A
        planner given a ``crossover`` always gathers (within it).

        Parameters
        ----------
        level, batch_size : int
        backend : str
        training : bool, default False
            Whether gradients flow to the cores (a floor for each case).

        Returns
        -------
        bool

        Examples
        --------
        >>> from mumoe import cp
        >>> planner = Planner(cp(768, 768, expert_dims=4096, rank=256))
        >>> planner.worth_gathering(0, 256, "pytorch"), planner.worth_gathering(0, 1, "pytorch")
        (True, False)
        """
        if self.crossover is not None:
            return True
        net = self.network
        work = batch_size * net.expert_dims[level] * expert_widths(net)[level]
        return work >= sparse_min_work(backend, training)

    def sparse_forward(
        self,
        batch_size: int,
        backend: str,
        dtype: Hashable,
        levels: tuple[int, ...],
        ks: dict[int, int],
    ) -> tuple[SparseLayout, Plan]:
        """The forward contraction with ``levels`` given as supports of ``ks[e]`` entries a row.

        Cached as :meth:`forward`, per sparse levels too, and per bucket of
        ``k`` for the levels whose values stay operands (the path depends on
        ``k`` only there); fused levels' ``k`` does not enter the plan.

        Parameters
        ----------
        batch_size, backend, dtype
            As for :meth:`forward`.
        levels : tuple of int
            The sparse levels, increasing.
        ks : dict of int to int
            Entries per row of each sparse level's support.

        Returns
        -------
        layout, plan : SparseLayout, Plan
            The plan is called with the operands the layout lists.

        Examples
        --------
        >>> from mumoe import cp
        >>> planner = Planner(cp(5, 2, expert_dims=64, rank=3))
        >>> layout, plan = planner.sparse_forward(32, "numpy", "float64", (0,), {0: 4})
        >>> plan.equation
        'ac,ae,ce,de->ad'
        """
        layout = sparse_layout(self.network, levels)
        bucket = 1 if batch_size <= 1 else 1 << (batch_size - 1).bit_length()  # batch_bucket
        k_buckets = tuple(batch_bucket(ks[e]) for e in layout.value_levels)
        key = ("sparse", bucket, backend, dtype, levels, k_buckets)
        plan = self.cache.hit(key)
        if plan is None:
            sizes = dict(zip(layout.value_levels, k_buckets, strict=True))
            sizes.update({e: ks[e] for e in levels if e not in sizes})
            plan = self.cache.get(
                key, lambda: self._build_sparse(layout, bucket, sizes, backend, dtype)
            )
        return layout, plan

    def _build_sparse(
        self, layout: SparseLayout, batch_size: int, ks: dict[int, int], backend: Any, dtype: Any
    ) -> Plan:
        net = self.network
        return self._build(
            "sparse forward contraction",
            f"at batch {batch_size}",
            layout.equation,
            layout.shapes(net, batch_size, ks),
            (batch_size, *net.out_shape),
            self._other_optimize,
            dtype,
            lead=net.batch_symbol,
            bias_input=layout.input_position if net.bias and not net.splits_input else None,
            kernels=None if backend is None else backend_kernels(backend),
        )

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        batch_size: int,
        backend: str,
        dtype: Hashable,
        timer: Callable[[Plan], float] | None = None,
        device: Hashable = None,
    ) -> Plan:
        """The compiled forward contraction for a batch of ``batch_size`` rows.

        Plans are cached per ``(batch bucket, backend, dtype)``, and with
        ``autotune`` per device too (a path timed on one device is not the
        fastest on another); the path is searched at the bucket size, the
        next power of two.

        Parameters
        ----------
        batch_size : int
            Number of rows once the leading dimensions are flattened.
        backend : str
            TensorLy backend name the operands live on.
        dtype : hashable
            The operands' dtype.
        timer : callable, optional
            With ``autotune``, measures a candidate plan on the caller's
            operands (seconds); the fastest candidate is cached.
        device : hashable, optional
            With ``autotune``, the device of the operands
            (:func:`mumoe.backends.array_device`): part of the cache key.

        Returns
        -------
        Plan
            Called with ``(*gates, x, *cores)``: each gate ``(B, N_e)``, ``x``
            and the cores; returns ``(B, O)``.  With a bias, ``x`` is
            ``(B, I)`` when ``bias_inside=True`` is passed (see
            :meth:`Plan.bias_inside <mumoe.plan.Plan.bias_inside>`) and
            ``(B, I + 1)``, ones last, otherwise.

        Examples
        --------
        >>> from mumoe import cp
        >>> plan = Planner(cp(5, 2, expert_dims=8, rank=3)).forward(100, "numpy", "float64")
        >>> plan.shapes[0]  # bucket 128
        (128, 8)
        """
        bucket = 1 if batch_size <= 1 else 1 << (batch_size - 1).bit_length()  # batch_bucket
        key = ("forward", bucket, backend, dtype)
        if self.autotune and timer is not None:
            tuned = (*key, device)
            return self.cache.get(tuned, lambda: self._tune(bucket, backend, dtype, timer))
        plan = self.cache.hit(key)  # the common case: no closure built
        if plan is None:
            plan = self.cache.get(
                key, lambda: self.build_forward(bucket, backend=backend, dtype=dtype)
            )
        return plan

    def _tune(
        self, batch_size: int, backend: str, dtype: Hashable, timer: Callable[[Plan], float]
    ) -> Plan:
        own = self.build_forward(batch_size, backend=backend, dtype=dtype)
        candidates = {own.path: own}
        for optimize in AUTOTUNE_OPTIMIZERS:
            plan = self.build_forward(batch_size, optimize, backend=backend)
            # A candidate over the budget is not timed: timing allocates it.
            if self._fits(plan, dtype):
                candidates.setdefault(plan.path, plan)
        return min(candidates.values(), key=timer)

    def build_forward(
        self,
        batch_size: int,
        optimize: Any = None,
        *,
        backend: str | None = None,
        dtype: Hashable = None,
    ) -> Plan:
        """Build (without caching) the forward plan for ``batch_size`` rows.

        Parameters
        ----------
        batch_size : int
        optimize : str or path, optional
            The optimiser; this planner's by default.
        backend : str, optional
            The backend the plan runs on, for the kernels it declares
            (:func:`mumoe.plan.backend_kernels`).
        dtype : hashable, optional
            The operands' dtype, for the memory budget (8 bytes an entry
            where None).  Only this planner's own optimiser is held to the
            budget: an ``optimize`` given here is built as it is.

        Returns
        -------
        Plan

        Raises
        ------
        PlanTooLargeError
            If no path keeps within the memory budget.

        Examples
        --------
        >>> from mumoe import cp
        >>> Planner(cp(5, 2, expert_dims=8, rank=3)).build_forward(4, "greedy").shapes[0]
        (4, 8)
        """
        net = self.network
        shapes = net.forward_shapes(batch_size)
        result = (batch_size, *net.out_shape)
        return self._build(
            "forward contraction",
            f"at batch {batch_size}",
            net.einsum_equation,
            shapes,
            result,
            self.optimize if optimize is None else optimize,
            dtype,
            limited=optimize is None,
            lead=net.batch_symbol,
            # x follows the gates; a split input comes with its bias slice (input_operand)
            bias_input=net.n_levels if net.bias and not net.splits_input else None,
            kernels=None if backend is None else backend_kernels(backend),
        )

    def _build(
        self,
        what: str,
        where: str,
        equation: str,
        shapes: Sequence[Sequence[int]],
        result: Sequence[int],
        optimize: Any,
        dtype: Hashable,
        *,
        limited: bool = True,
        **options: Any,
    ) -> Plan:
        # Plan.build within this planner's budget, its error told in bytes and in the
        # network's terms.
        limit = self._entries(shapes, result, dtype) if limited else None
        try:
            return Plan.build(equation, shapes, optimize, memory_limit=limit, **options)
        except PlanTooLargeError as error:
            size = itemsize(dtype)
            where = f" {where}" if where else ""
            raise PlanTooLargeError(
                f"the {what} of {short_name(self.network)}{where} needs an intermediate of "
                f"{error.needed:,} entries ({bytes_text(error.needed * size)} "
                f"{dtype_text(dtype)}), over the planner's memory budget of "
                f"{bytes_text(self.memory_limit or 0)}: {error.reason}; use smaller batches or "
                "bonds, or a planner with a larger budget: planner_of(network, "
                "memory_limit=...) (None: no budget)",
                needed=error.needed,
                limit=error.limit,
                reason=error.reason,
            ) from None

    def _entries(
        self, shapes: Sequence[Sequence[int]], result: Sequence[int], dtype: Hashable
    ) -> int | None:
        """The budget in entries of one intermediate of a contraction of ``shapes``."""
        if self.memory_limit is None:
            return None
        unavoidable = max(math.prod(shape) for shape in (*shapes, result))
        return max(self.memory_limit // itemsize(dtype), unavoidable)

    def _fits(self, plan: Plan, dtype: Hashable) -> bool:
        result = (plan.shapes[0][0], *self.network.out_shape)
        limit = self._entries(plan.shapes, result, dtype)
        return limit is None or plan.largest_intermediate <= limit

    def chosen(
        self, batch_size: int, backend: str | None = None, dtype: Hashable = None
    ) -> tuple[Plan, str]:
        """The forward plan a call with ``batch_size`` rows uses, and where it came from.

        The cached plan of that batch bucket (of ``backend`` and ``dtype``
        when given, else the one used most recently), which is the autotuned
        one once timed; otherwise the plan of this planner's optimiser, which
        a forward pass would build.

        Parameters
        ----------
        batch_size : int
        backend : str, optional
        dtype : hashable, optional

        Returns
        -------
        plan : Plan
        source : str
            ``"autotuned"``, ``"cached"`` or ``"not built yet"`` (with
            autotune, the path is then the optimiser's until a call times it).

        Examples
        --------
        >>> from mumoe import cp
        >>> Planner(cp(5, 2, expert_dims=8, rank=3)).chosen(4)[1]
        'not built yet'
        """
        bucket = batch_bucket(batch_size)
        for key in reversed(self.cache.keys()):
            if (
                isinstance(key, tuple)
                and key[:2] == ("forward", bucket)
                and backend in (None, key[2])
                and (dtype is None or dtype == key[3])
            ):
                plan = self.cache.peek(key)
                if plan is not None:
                    return plan, "autotuned" if self.autotune else "cached"
        return self.build_forward(bucket, dtype=dtype), "not built yet"

    def flops(self, batch_size: int, plan: Plan | None = None) -> int:
        """FLOPs of the forward contraction over ``batch_size`` rows along :meth:`chosen`'s path.

        Parameters
        ----------
        batch_size : int
        plan : Plan, optional
            Count along this plan's path instead.

        Returns
        -------
        int

        Examples
        --------
        >>> from mumoe import cp
        >>> Planner(cp(8, 4, expert_dims=16, rank=3)).flops(10)
        1770
        """
        path = (plan or self.chosen(batch_size)[0]).path
        net = self.network
        _, info = opt_einsum.contract_path(
            net.einsum_equation,
            *net.forward_shapes(batch_size),
            shapes=True,
            optimize=list(path),
        )
        return int(info.opt_cost)

    # ------------------------------------------------------- dense and expert

    def materialize(self, backend: str, dtype: Hashable) -> Plan:
        """The compiled contraction of all cores into ``W`` (``tensor_shape``).

        Parameters
        ----------
        backend : str
            The TensorLy backend the plan is for.
        dtype : hashable
            The cores' dtype.

        Returns
        -------
        Plan

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp
        >>> net = cp(5, 2, expert_dims=8, rank=3)
        >>> cores = [np.ones(s) for s in net.core_shapes]
        >>> Planner(net).materialize("numpy", "float64")(*cores).shape
        (8, 6, 2)
        """
        return self.cache.get(
            ("materialize", backend, dtype), lambda: self._materialize(backend, dtype)
        )

    def _materialize(self, backend: str, dtype: Hashable) -> Plan:
        net = self.network
        return self._build(
            "contraction into W",
            "",
            net.materialize_equation,
            net.core_shapes,
            net.tensor_shape,
            self._other_optimize,
            dtype,
            kernels=backend_kernels(backend),
        )

    def expert(self, backend: str, dtype: Hashable) -> Plan:
        """The compiled contraction of the cores, expert legs sliced away, into the role legs.

        Called with the cores after indexing each expert leg at one expert.

        Parameters
        ----------
        backend : str
        dtype : hashable

        Returns
        -------
        Plan

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp
        >>> sliced = [np.ones(3), np.ones((6, 3)), np.ones((2, 3))]  # expert leg indexed away
        >>> Planner(cp(5, 2, expert_dims=8, rank=3)).expert("numpy", "float64")(*sliced)[0]
        array([3., 3.])
        """
        return self.cache.get(("expert", backend, dtype), lambda: self._expert(backend, dtype))

    def _expert(self, backend: str, dtype: Hashable) -> Plan:
        net = self.network
        shapes = [[net.sizes[leg] for leg in legs] for legs in net.expert_core_legs]
        result = net.tensor_shape[net.n_levels :]
        kernels = backend_kernels(backend)
        return self._build(
            "contraction of one expert",
            "",
            net.expert_equation,
            shapes,
            result,
            self._other_optimize,
            dtype,
            kernels=kernels,
        )

    @property
    def _other_optimize(self) -> str:
        # An explicit path fits the forward equation only.
        return self.optimize if isinstance(self.optimize, str) else DEFAULT_OPTIMIZE


def _unpickle(
    network: Network,
    optimize: Any,
    cache_size: int,
    autotune: bool,
    memory_limit: int | None,
    crossover: float | None = None,
) -> Planner:
    return planner_of(
        network,
        optimize=optimize,
        cache_size=cache_size,
        autotune=autotune,
        memory_limit=memory_limit,
        crossover=crossover,
    )


#: How many planners :func:`planner_of` keeps (least recently used dropped first).
PLANNERS_KEPT = 256

_PLANNERS: OrderedDict[Hashable, Planner] = OrderedDict()
_PLANNERS_LOCK = threading.Lock()


def _policy_key(optimize: Any) -> Hashable:
    # An explicit path as a tuple of tuples; names and PathOptimizer objects as they are.
    if isinstance(optimize, str) or not isinstance(optimize, Sequence):
        return optimize
    return tuple(tuple(step) for step in optimize)


def planner_of(
    network: Network,
    *,
    optimize: str | Sequence[tuple[int, ...]] = DEFAULT_OPTIMIZE,
    autotune: bool = False,
    cache_size: int = 32,
    memory_limit: int | None = MEMORY_LIMIT,
    crossover: float | None = None,
) -> Planner:
    """The planner of ``network`` under a path policy, made once and then kept.

    A bounded, thread-safe map keyed by the (hashable) network and the policy
    holds the planners, so equal networks share their plans; the default
    policy is what :func:`mumoe.forward` and the layers use unless given a
    planner of their own.  The map keeps the :data:`PLANNERS_KEPT` used
    most recently; a layer keeps its own planner alive.

    Parameters
    ----------
    network : Network
    optimize, autotune, cache_size, memory_limit, crossover
        The policy; see :class:`Planner`.

    Returns
    -------
    Planner

    Raises
    ------
    ValueError, TypeError
        As :class:`Planner`.

    Examples
    --------
    >>> from mumoe import cp
    >>> planner_of(cp(5, 2, expert_dims=8, rank=3)) is planner_of(cp(5, 2, expert_dims=8, rank=3))
    True
    >>> planner_of(cp(5, 2, expert_dims=8, rank=3), autotune=True).autotune
    True
    """
    key = (network, _policy_key(optimize), autotune, cache_size, memory_limit, crossover)
    try:
        planner = _PLANNERS[key]
    except TypeError:  # an unhashable optimiser: refused with the reason
        check_optimize(optimize, network.n_levels + 1 + network.n_cores)
        raise
    except KeyError:
        planner = Planner(
            network,
            optimize=optimize,
            cache_size=cache_size,
            autotune=autotune,
            memory_limit=memory_limit,
            crossover=crossover,
        )
        with _PLANNERS_LOCK:
            planner = _PLANNERS.setdefault(key, planner)
            while len(_PLANNERS) > PLANNERS_KEPT:
                _PLANNERS.popitem(last=False)
        return planner
    with _PLANNERS_LOCK:
        if key in _PLANNERS:
            _PLANNERS.move_to_end(key)
    return planner


def flops(network: Network, batch_size: int = 1, *, planner: Planner | None = None) -> int:
    """Floating-point operations of one forward pass over ``batch_size`` rows.

    Counts the contraction of gates, input and cores along the path the
    forward pass uses for this batch size (the autotuned one, once timed;
    see :meth:`Planner.chosen`); a multiply-add counts as two.  The bias is
    included (the input leg counts :math:`I + 1` rows with a bias); computing
    the gates themselves (projection, normalisation, activation) is not.

    Parameters
    ----------
    network : Network
    batch_size : int, default 1
    planner : Planner, optional
        Whose path to count along; :func:`planner_of` ``(network)`` by default.

    Returns
    -------
    int

    Examples
    --------
    >>> from mumoe import Network
    >>> flops(Network("n r, i r, o r", 8, 4, expert_dims=16, rank=3), batch_size=10)
    1770
    >>> no_bias = Network("n r, i r, o r", 8, 4, expert_dims=16, rank=3, bias=False)
    >>> flops(no_bias, batch_size=10)  # 2bR less
    1710
    """
    planner = resolve_planner(network, planner)
    return planner.flops(positive_int(batch_size, "batch_size"))


def resolve_planner(network: Network, planner: Planner | None = None) -> Planner:
    """The planner a call with ``network`` uses: ``planner`` if it plans it, else the default.

    Parameters
    ----------
    network : Network
    planner : Planner, optional
        A planner of ``network``; :func:`planner_of` ``(network)`` if None.

    Returns
    -------
    Planner

    Raises
    ------
    TypeError
        If ``planner`` is not a :class:`Planner`.
    ValueError
        If it plans another network.

    Examples
    --------
    >>> from mumoe import cp
    >>> net = cp(5, 2, expert_dims=8, rank=3)
    >>> resolve_planner(net) is planner_of(net)
    True
    """
    if planner is None:
        return planner_of(network)
    if not isinstance(planner, Planner):
        raise TypeError(f"planner must be a mumoe.plan.Planner, got {type(planner).__qualname__}")
    if planner.network != network:
        raise ValueError(
            f"the planner plans {planner.network!r}, not the network given, {network!r}"
        )
    return planner
