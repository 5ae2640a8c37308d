r"""Declarative tensor networks that store the weight tensor of a μMoE layer.

A :class:`Network` is a spec (see :mod:`mumoe.spec`) plus sizes: the expert
dimensions :math:`N_1, \dots, N_E`, the input and output sizes :math:`I` and
:math:`O`, whether the input mode carries a bias slice, and the size (rank) of
every bond.  It knows the shape of each core, the parameter count, the einsum
equations of the factorised forward pass and of the dense weight, and it owns
the cache of compiled contraction plans for those equations.

The network stores no arrays: the cores are passed to the functions of
:mod:`mumoe.functional`, so one network serves NumPy, CuPy and PyTorch alike.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import opt_einsum

from mumoe.contraction import PairStep
from mumoe.plan import DEFAULT_OPTIMIZE, Plan, PlanCache, batch_bucket
from mumoe.spec import INPUT, OUTPUT, parse_spec
from mumoe.typing import RankLike, Shape

__all__ = ["AUTOTUNE_OPTIMIZERS", "Network", "positive_int"]

#: The opt_einsum optimisers whose paths autotuning times, besides the network's own.
AUTOTUNE_OPTIMIZERS = ("greedy", "branch-2", "dp", "random-greedy-128")


def positive_int(value: Any, what: str) -> int:
    """Return ``value`` as a positive int, or raise naming ``what``.

    Integers of any library (``numpy.int64`` ...) are accepted; ``bool``,
    floats and non-positive values are not.

    Parameters
    ----------
    value : int-like
    what : str
        How the error message names ``value``.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        If ``value`` is a bool or not an integer.
    ValueError
        If it is not positive.

    Examples
    --------
    >>> import numpy as np
    >>> positive_int(np.int64(3), "rank")
    3
    >>> positive_int(0, "rank")
    Traceback (most recent call last):
        ...
    ValueError: rank must be a positive int, got 0
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a positive int, got the bool {value!r}")
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a positive int, got {value!r}") from None
    if size < 1:
        raise ValueError(f"{what} must be a positive int, got {size}")
    return size


class Network:
    r"""A tensor network holding the weights of all experts of a μMoE layer.

    The network stores, in factorised form, the weight tensor
    :math:`\mathcal{W}` of shape ``(N_1, ..., N_E, I', O)`` with
    ``I' = I + 1`` when ``bias`` is true (the last input slice is the bias of
    every expert) and ``I' = I`` otherwise.

    Parameters
    ----------
    spec : str
        The cores and their legs, e.g. ``"n r, i r, o r"``; see
        :func:`mumoe.spec.parse_spec`.
    expert_dims : int or sequence of int
        :math:`N_1, \dots, N_E`, the number of experts along each expert
        level; an int when there is one level.
    in_features : int
        :math:`I`, the size of the input.
    out_features : int
        :math:`O`, the size of the output.
    rank : int or mapping of str to int, optional
        The size of every bond: one int for all, or a mapping from bond name
        to size that names each bond.  Needed whenever the spec has bonds.
    bias : bool, default True
        Whether the input mode has an extra bias slice.
    format : str, default "custom"
        The name of the factorisation, shown by :meth:`describe`; the
        presets set it to ``"cp"``, ``"tucker"``, ``"tt"``, ``"tr"`` or
        ``"dense"``.
    optimize : str or path, default "auto-hq"
        The opt_einsum path optimiser used when a plan is first built, or an
        explicit path (opt_einsum's format) for the forward contraction of
        ``(*gates, x, *cores)``; the other contractions then use "auto-hq".
    cache_size : int, default 32
        The most compiled plans this network keeps.
    autotune : bool, default False
        Time the candidate plans of :data:`AUTOTUNE_OPTIMIZERS` on the first
        forward call with each new batch bucket, backend and dtype, and keep
        the fastest; otherwise use the path of ``optimize``.

    Raises
    ------
    ValueError
        If the spec is invalid (see :func:`~mumoe.spec.parse_spec`), a size
        is missing or not positive, the number of expert dimensions does not
        match the expert legs, or ``rank`` names a bond the spec lacks.
    TypeError
        If a size is not an integer.

    Examples
    --------
    >>> net = Network("n r, i r, o r", 16, 8, 4, rank=3)
    >>> net.core_shapes
    ((16, 3), (9, 3), (4, 3))
    >>> net.n_params
    87
    """

    def __init__(
        self,
        spec: str,
        expert_dims: int | Sequence[int],
        in_features: int,
        out_features: int,
        *,
        rank: RankLike | None = None,
        bias: bool = True,
        format: str = "custom",
        optimize: str | Sequence[tuple[int, ...]] = DEFAULT_OPTIMIZE,
        cache_size: int = 32,
        autotune: bool = False,
    ) -> None:
        parsed = parse_spec(spec)
        n_levels = len(parsed.expert_legs)

        if isinstance(expert_dims, Sequence) and not isinstance(expert_dims, str):
            dims = tuple(positive_int(d, f"expert_dims[{e}]") for e, d in enumerate(expert_dims))
        else:
            dims = (positive_int(expert_dims, "expert_dims"),)
        if len(dims) != n_levels:
            raise ValueError(
                f"spec {parsed.spec!r} has {n_levels} expert level(s) "
                f"({', '.join(parsed.expert_legs)}) but expert_dims has {len(dims)} "
                f"entries: {dims}"
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")

        self.spec: str = parsed.spec
        self.cores: tuple[tuple[str, ...], ...] = parsed.cores
        self.expert_legs: tuple[str, ...] = parsed.expert_legs
        self.bonds: tuple[str, ...] = parsed.bonds
        self.expert_dims: tuple[int, ...] = dims
        self.in_features: int = positive_int(in_features, "in_features")
        self.out_features: int = positive_int(out_features, "out_features")
        self.bias: bool = bias
        self.format: str = str(format)
        self.optimize = optimize
        if not isinstance(autotune, bool):
            raise TypeError(f"autotune must be True or False, got {autotune!r}")
        self.autotune = autotune
        self.ranks: Mapping[str, int] = MappingProxyType(self._bond_sizes(rank))

        sizes = dict(zip(self.expert_legs, dims, strict=True))
        sizes[INPUT] = self.in_features + int(bias)
        sizes[OUTPUT] = self.out_features
        sizes.update(self.ranks)
        self.sizes: Mapping[str, int] = MappingProxyType(sizes)
        self._core_shapes = tuple(tuple(sizes[leg] for leg in legs) for legs in self.cores)

        # Einsum symbols: the batch first, then every leg in order of appearance.
        legs = [*self.expert_legs, INPUT, OUTPUT, *self.bonds]
        self._symbol = {leg: opt_einsum.get_symbol(k + 1) for k, leg in enumerate(legs)}
        self._batch = opt_einsum.get_symbol(0)
        self._plans = PlanCache(cache_size)

    def _bond_sizes(self, rank: RankLike | None) -> dict[str, int]:
        if not self.bonds:
            if rank is not None and not isinstance(rank, int | Mapping):
                raise TypeError(f"rank must be an int or a mapping of bond sizes, got {rank!r}")
            if isinstance(rank, Mapping) and rank:
                raise ValueError(
                    f"rank names bonds {sorted(rank)} but spec {self.spec!r} has no bonds"
                )
            return {}
        if rank is None:
            raise ValueError(
                f"spec {self.spec!r} has bonds {', '.join(self.bonds)} but no rank was given; "
                f"pass rank=<int> or rank={{{', '.join(f'{b!r}: ...' for b in self.bonds)}}}"
            )
        if isinstance(rank, Mapping):
            unknown = [b for b in rank if b not in self.bonds]
            if unknown:
                raise ValueError(
                    f"rank names bond {unknown[0]!r}, which is not in spec {self.spec!r} "
                    f"(its bonds are {', '.join(self.bonds)})"
                )
            missing = [b for b in self.bonds if b not in rank]
            if missing:
                raise ValueError(
                    f"bond {missing[0]!r} of spec {self.spec!r} has no size; "
                    f"add it to rank (given: {dict(rank)})"
                )
            return {b: positive_int(rank[b], f"rank[{b!r}]") for b in self.bonds}
        size = positive_int(rank, "rank")
        return dict.fromkeys(self.bonds, size)

    # ------------------------------------------------------------------ sizes

    @property
    def n_levels(self) -> int:
        """:math:`E`, the number of expert levels.

        Examples
        --------
        >>> Network("n1 a, n2 a, i a, o a", (4, 3), 5, 2, rank=2).n_levels
        2
        """
        return len(self.expert_legs)

    @property
    def n_experts(self) -> int:
        r""":math:`\prod_e N_e`, the total number of experts.

        Examples
        --------
        >>> Network("n1 a, n2 a, i a, o a", (4, 3), 5, 2, rank=2).n_experts
        12
        """
        return math.prod(self.expert_dims)

    @property
    def n_cores(self) -> int:
        """The number of cores.

        Examples
        --------
        >>> Network("n1 a, n2 a, i a, o a", (4, 3), 5, 2, rank=2).n_cores
        4
        """
        return len(self.cores)

    @property
    def weight_shape(self) -> Shape:
        """Shape of the dense weight tensor: ``(N_1, …, N_E, I', O)``.

        Examples
        --------
        >>> Network("n r, i r, o r", 8, 5, 2, rank=3).weight_shape  # I' = 5 + 1 with the bias
        (8, 6, 2)
        """
        return (*self.expert_dims, self.sizes[INPUT], self.out_features)

    @property
    def core_shapes(self) -> tuple[Shape, ...]:
        """The shape of each core, its legs in spec order.

        Examples
        --------
        >>> Network("r0 n r1, r1 i r2, r2 o r0", 8, 5, 2, rank=3).core_shapes
        ((3, 8, 3), (3, 6, 3), (3, 2, 3))
        """
        return self._core_shapes

    @property
    def n_params(self) -> int:
        """The number of parameters of all cores together.

        Examples
        --------
        >>> Network("n r, i r, o r", 8, 5, 2, rank=3).n_params  # 3 * (8 + 6 + 2)
        48
        """
        return sum(math.prod(shape) for shape in self.core_shapes)

    @property
    def n_dense_params(self) -> int:
        """The number of entries of the dense weight tensor ``W``.

        Examples
        --------
        >>> Network("n r, i r, o r", 8, 5, 2, rank=3).n_dense_params  # 8 * 6 * 2
        96
        """
        return math.prod(self.weight_shape)

    # -------------------------------------------------------------- equations

    def _term(self, legs: Sequence[str], batch: bool = False) -> str:
        return (self._batch if batch else "") + "".join(self._symbol[leg] for leg in legs)

    def _forward_operands(self) -> list[str]:
        gates = [self._term([leg], batch=True) for leg in self.expert_legs]
        return [*gates, self._term([INPUT], batch=True), *map(self._term, self.cores)]

    @property
    def einsum_equation(self) -> str:
        """The factorised forward pass as one einsum over gates, input and cores.

        Operands in order: the gates ``(batch, N_e)``, the input
        ``(batch, I')`` and the cores; output ``(batch, O)``.  The symbols are
        opt_einsum's.

        Examples
        --------
        >>> Network("n r, i r, o r", 8, 5, 2, rank=3).einsum_equation
        'ab,ac,be,ce,de->ad'
        """
        return ",".join(self._forward_operands()) + "->" + self._term([OUTPUT], batch=True)

    @property
    def equation(self) -> str:
        """The factorised forward pass in the spec's own leg names.

        ``...`` stands for the batch dimensions.

        Examples
        --------
        >>> Network("n r, i r, o r", 16, 8, 4, rank=3).equation
        '...n1, ...i, n1 r, i r, o r -> ...o'
        """
        inputs = [f"...{leg}" for leg in (*self.expert_legs, INPUT)]
        inputs += [" ".join(legs) for legs in self.cores]
        return ", ".join(inputs) + f" -> ...{OUTPUT}"

    @property
    def dense_equation(self) -> str:
        """Eq. (1) over the dense weight as one einsum: ``W``, the gates, the input.

        Examples
        --------
        >>> Network("n r, i r, o r", 8, 5, 2, rank=3).dense_equation
        'bcd,ab,ac->ad'
        """
        weight = self._term([*self.expert_legs, INPUT, OUTPUT])
        gates = [self._term([leg], batch=True) for leg in self.expert_legs]
        return (
            ",".join([weight, *gates, self._term([INPUT], batch=True)])
            + "->"
            + (self._term([OUTPUT], batch=True))
        )

    # ------------------------------------------------------------------ plans

    def forward_plan(
        self,
        batch_size: int,
        backend: str,
        dtype: Hashable,
        timer: Callable[[Plan], float] | None = None,
    ) -> Plan:
        """The compiled forward contraction for a batch of ``batch_size`` rows.

        Plans are cached per ``(batch bucket, backend, dtype)``; the path is
        searched at the bucket size, the next power of two.

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

        Returns
        -------
        Plan
            Called with ``(*gates, x, *cores)``: each gate ``(B, N_e)``, ``x``
            and the cores; returns ``(B, O)``.  With a bias, ``x`` is
            ``(B, I)`` when ``plan.program.split`` (the bias is added inside
            the contraction) and ``(B, I + 1)``, ones last, otherwise.

        Examples
        --------
        >>> net = Network("n r, i r, o r", 8, 5, 2, rank=3)
        >>> plan = net.forward_plan(100, "numpy", "float64")
        >>> plan.shapes[0], net.forward_plan(70, "numpy", "float64") is plan  # bucket 128
        ((128, 8), True)
        """
        bucket = batch_bucket(batch_size)
        key = ("forward", bucket, backend, dtype)
        if self.autotune and timer is not None:
            return self._plans.get(key, lambda: self._tune_forward(bucket, timer))
        return self._plans.get(key, lambda: self._build_forward(bucket))

    def _tune_forward(self, batch_size: int, timer: Callable[[Plan], float]) -> Plan:
        candidates: dict[tuple[tuple[int, ...], ...], Plan] = {}
        for optimize in (self.optimize, *AUTOTUNE_OPTIMIZERS):
            plan = self._build_forward(batch_size, optimize)
            candidates.setdefault(plan.path, plan)
        return min(candidates.values(), key=timer)

    def _forward_shapes(self, batch_size: int) -> list[Shape]:
        # Operands of the forward contraction: gates, x (with its bias column), cores.
        shapes: list[Shape] = [(batch_size, n) for n in self.expert_dims]
        return [*shapes, (batch_size, self.sizes[INPUT]), *self.core_shapes]

    def _build_forward(self, batch_size: int, optimize: Any = None) -> Plan:
        shapes = self._forward_shapes(batch_size)
        split = self.n_levels if self.bias else None  # x follows the gates
        return Plan.build(
            self.einsum_equation,
            shapes,
            self.optimize if optimize is None else optimize,
            lead=self._batch,
            split=split,
        )

    def materialize_plan(self, backend: str, dtype: Hashable) -> Plan:
        """The compiled contraction of all cores into ``W`` (``weight_shape``).

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
        >>> net = Network("n r, i r, o r", 8, 5, 2, rank=3)
        >>> net.materialize_plan("numpy", "float64")(*[np.ones(s) for s in net.core_shapes]).shape
        (8, 6, 2)
        """
        key = ("materialize", backend, dtype)
        return self._plans.get(key, self._build_materialize)

    def _build_materialize(self) -> Plan:
        output = self._term([*self.expert_legs, INPUT, OUTPUT])
        equation = ",".join(map(self._term, self.cores)) + "->" + output
        return Plan.build(equation, self.core_shapes, self._other_optimize)

    def expert_plan(self, backend: str, dtype: Hashable) -> Plan:
        """The compiled contraction of the cores, expert legs sliced away, into ``(I', O)``.

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
        >>> net = Network("n r, i r, o r", 8, 5, 2, rank=3)
        >>> sliced = [np.ones(3), np.ones((6, 3)), np.ones((2, 3))]  # expert leg indexed away
        >>> net.expert_plan("numpy", "float64")(*sliced)[0]
        array([3., 3.])
        """
        key = ("expert", backend, dtype)
        return self._plans.get(key, self._build_expert)

    def _build_expert(self) -> Plan:
        experts = set(self.expert_legs)
        kept = [[leg for leg in legs if leg not in experts] for legs in self.cores]
        shapes = [[self.sizes[leg] for leg in legs] for legs in kept]
        equation = ",".join(map(self._term, kept)) + "->" + self._term([INPUT, OUTPUT])
        return Plan.build(equation, shapes, self._other_optimize)

    @property
    def _other_optimize(self) -> str:
        # An explicit path fits the forward equation only.
        return self.optimize if isinstance(self.optimize, str) else DEFAULT_OPTIMIZE

    @property
    def plans(self) -> PlanCache:
        """The cache of compiled plans of this network (bounded, thread-safe).

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import forward, random_cores
        >>> net = Network("n r, i r, o r", 8, 5, 2, rank=3, cache_size=4)
        >>> _ = forward(net, random_cores(net), np.ones((3, 5)), [np.ones((3, 8))])
        >>> net.plans
        PlanCache(size=1, maxsize=4, hits=0, misses=1)
        """
        return self._plans

    def flops(self, batch_size: int = 1) -> int:
        """Floating-point operations of one forward pass over ``batch_size`` rows.

        Counts the contraction of gates, input and cores along the path a
        plan for this batch size uses (a multiply-add counts as two).  The
        gates themselves and the bias column are not included.

        Parameters
        ----------
        batch_size : int, default 1

        Returns
        -------
        int

        Examples
        --------
        >>> Network("n r, i r, o r", 16, 8, 4, rank=3).flops(batch_size=10)
        1770
        """
        batch_size = positive_int(batch_size, "batch_size")
        return self._flops(batch_size, self._build_forward(batch_bucket(batch_size)).path)

    def _flops(self, batch_size: int, path: Sequence[tuple[int, ...]]) -> int:
        _, info = opt_einsum.contract_path(
            self.einsum_equation,
            *self._forward_shapes(batch_size),
            shapes=True,
            optimize=list(path),
        )
        return int(info.opt_cost)

    # ------------------------------------------------------------ description

    def describe(self, batch_size: int = 1) -> str:
        """A readable account of the network: sizes, cores, equation, path and costs.

        Parameters
        ----------
        batch_size : int, default 1
            The batch size the path and FLOPs are reported for.

        Returns
        -------
        str

        Examples
        --------
        >>> net = Network("n r, i r, o r", 8, 5, 2, rank=3)
        >>> print(net.describe(batch_size=4))  # doctest: +ELLIPSIS
        Network 'custom': 1 expert level, 8 experts, with bias
          spec        n1 r, i r, o r
          ...
          FLOPs       ... for batch 4
          ...
        """
        batch_size = positive_int(batch_size, "batch_size")
        plan = self._build_forward(batch_bucket(batch_size))
        levels = f"{self.n_levels} expert level{'s' if self.n_levels > 1 else ''}"
        experts = f"{self.n_experts:,} experts"
        if self.n_levels > 1:
            experts = f"{' x '.join(map(str, self.expert_dims))} = {experts}"
        sizes = [f"{leg}={self.sizes[leg]}" for leg in self.expert_legs]
        in_size = f"{INPUT}={self.sizes[INPUT]}"
        if self.bias:
            in_size += f" ({self.in_features} + bias)"
        sizes += [in_size, f"{OUTPUT}={self.out_features}"]
        sizes += [f"{bond}={size}" for bond, size in self.ranks.items()]

        width = max(len(" ".join(legs)) for legs in self.cores)
        cores = [
            f"#{k} {' '.join(legs):<{width}}  {shape!s:<18} {math.prod(shape):>12,}"
            for k, (legs, shape) in enumerate(zip(self.cores, self.core_shapes, strict=True))
        ]
        ratio = self.n_dense_params / self.n_params
        operands = [*(f"gate {leg}" for leg in self.expert_legs), "input"]
        operands += [f"core {k}" for k in range(self.n_cores)]
        steps = []
        names = list(operands)
        for n, (contraction, step) in enumerate(zip(plan.path, plan.program.steps, strict=True), 1):
            order = (step.left, step.right) if isinstance(step, PairStep) else contraction
            picked = [names[j] for j in order]
            for j in sorted(contraction, reverse=True):
                del names[j]
            names.append(f"({n})")
            kind = step.kind if isinstance(step, PairStep) else "sum"
            steps.append(f"({n}) {' * '.join(picked)}: {step.equation}  [{kind}]")

        pad = "\n" + " " * 14
        lines = [
            f"Network '{self.format}': {levels}, {experts}, {'with' if self.bias else 'no'} bias",
            f"  spec        {self.spec}",
            f"  sizes       {', '.join(sizes)}",
            f"  cores       {pad.join(cores)}",
            f"  parameters  {self.n_params:,} (dense W {self.weight_shape}: "
            f"{self.n_dense_params:,}, {ratio:,.1f}x more)",
            f"  equation    {self.equation}",
            f"  einsum      {self.einsum_equation}",
            f"  path        batch {batch_size}, opt_einsum {self.optimize!r}:{pad}"
            + pad.join(steps),
            f"  FLOPs       {self._flops(batch_size, plan.path):,} for batch {batch_size}",
            f"  bias        {self._bias_text(plan)}",
        ]
        return "\n".join(lines)

    def _bias_text(self, plan: Plan) -> str:
        if not self.bias:
            return "none"
        split = plan.split_program
        if split is None:
            return "a column of ones concatenated to x (the path meets x before its core)"
        step = next(k for k, s in enumerate(split.steps, 1) if isinstance(s, PairStep) and s.split)
        return (
            f"x @ core[:I] + core[I] in step ({step}) without gradients to the cores or for "
            f"batches over {2 * split.split_width:,} rows; else a column of ones"
        )

    # ------------------------------------------------------- identity, pickle

    def _identity(self) -> tuple[Any, ...]:
        return (
            self.spec,
            self.expert_dims,
            self.in_features,
            self.out_features,
            tuple(self.ranks.items()),
            self.bias,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Network):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        rank = f", rank={dict(self.ranks)}" if self.ranks else ""
        dims = self.expert_dims[0] if self.n_levels == 1 else self.expert_dims
        return (
            f"Network({self.spec!r}, {dims}, {self.in_features}, {self.out_features}"
            f"{rank}, bias={self.bias}, format={self.format!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Compiled plans are never pickled: they are rebuilt on first use.
        state = self.__dict__.copy()
        state["ranks"] = dict(self.ranks)
        state["sizes"] = dict(self.sizes)
        state["_plans"] = self._plans.maxsize
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["ranks"] = MappingProxyType(state["ranks"])
        state["sizes"] = MappingProxyType(state["sizes"])
        state["_plans"] = PlanCache(state["_plans"])
        self.__dict__.update(state)
