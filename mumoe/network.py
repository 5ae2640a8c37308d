r"""Declarative tensor networks that store the weight tensor of a μMoE layer.

A :class:`Network` is a spec (see :mod:`mumoe.spec`) plus sizes: the expert
dimensions :math:`N_1, \dots, N_E`, the input and output sizes :math:`I` and
:math:`O`, whether the input mode carries a bias slice, and the size (rank) of
every bond.  It knows the shape of each core, the parameter count and the
einsum equation of the factorised forward pass.  It is immutable (change a
size with :meth:`Network.replace`); the compiled contraction plans live in
its :class:`~mumoe.planner.Planner`, and :mod:`mumoe.report` writes
:meth:`Network.describe`.

The network stores no arrays: the cores are passed to the functions of
:mod:`mumoe.functional`, so one network serves NumPy, CuPy and PyTorch alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import opt_einsum

from mumoe.formats import format_of
from mumoe.plan import DEFAULT_OPTIMIZE, PlanCache
from mumoe.planner import AUTOTUNE_OPTIMIZERS, Planner
from mumoe.spec import INPUT, OUTPUT, parse_spec
from mumoe.typing import RankLike, Shape
from mumoe.validation import check_bool, positive_int, positive_ints

__all__ = ["AUTOTUNE_OPTIMIZERS", "Network", "positive_int"]

_FIELDS = (
    "spec", "expert_dims", "in_features", "out_features", "rank", "bias",
    "optimize", "cache_size", "autotune",
)  # fmt: skip


class Network:
    r"""A tensor network holding the weights of all experts of a μMoE layer.

    The network stores, in factorised form, the weight tensor
    :math:`\mathcal{W}` of shape ``(N_1, ..., N_E, I', O)`` with
    ``I' = I + 1`` when ``bias`` is true (the last input slice is the bias of
    every expert) and ``I' = I`` otherwise.  Networks are immutable and
    hashable; :meth:`replace` makes a changed copy.

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
    optimize : str or path, default "flop-optimal"
        The path search used when a plan is first built: ``"flop-optimal"``
        (the least FLOPs, exactly, up to :data:`mumoe.paths.OPTIMAL_OPERANDS`
        operands; opt_einsum's ``"auto-hq"`` above), any opt_einsum
        optimiser, or an explicit path (opt_einsum's format) for the forward
        contraction of ``(*gates, x, *cores)``; the other contractions then
        use "flop-optimal".
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
        is not positive, the number of expert dimensions does not match the
        expert legs, or ``rank`` is missing or names a bond the spec lacks.
    TypeError
        If a size is not an integer or a flag not a bool.

    Examples
    --------
    >>> net = Network("n r, i r, o r", 16, 8, 4, rank=3)
    >>> net.core_shapes
    ((16, 3), (9, 3), (4, 3))
    >>> net.n_params, net.format
    (87, 'cp')
    >>> net.replace(in_features=7).core_shapes
    ((16, 3), (8, 3), (4, 3))
    """

    spec: str
    core_legs: tuple[tuple[str, ...], ...]
    expert_legs: tuple[str, ...]
    bonds: tuple[str, ...]
    expert_dims: tuple[int, ...]
    in_features: int
    out_features: int
    bias: bool
    format: str
    ranks: Mapping[str, int]
    sizes: Mapping[str, int]
    planner: Planner
    _core_shapes: tuple[Shape, ...]
    _symbol: dict[str, str]
    _batch: str

    def __init__(
        self,
        spec: str,
        expert_dims: int | Sequence[int],
        in_features: int,
        out_features: int,
        *,
        rank: RankLike | None = None,
        bias: bool = True,
        optimize: str | Sequence[tuple[int, ...]] = DEFAULT_OPTIMIZE,
        cache_size: int = 32,
        autotune: bool = False,
    ) -> None:
        parsed = parse_spec(spec)
        n_levels = len(parsed.expert_legs)
        dims = positive_ints(expert_dims, "expert_dims")
        if len(dims) != n_levels:
            raise ValueError(
                f"spec {parsed.spec!r} has {n_levels} expert level(s) "
                f"({', '.join(parsed.expert_legs)}) but expert_dims has {len(dims)} "
                f"entries: {dims}"
            )
        derived = format_of(parsed.spec, n_levels)
        put = object.__setattr__
        put(self, "spec", parsed.spec)
        put(self, "core_legs", parsed.core_legs)
        put(self, "expert_legs", parsed.expert_legs)
        put(self, "bonds", parsed.bonds)
        put(self, "expert_dims", dims)
        put(self, "in_features", positive_int(in_features, "in_features"))
        put(self, "out_features", positive_int(out_features, "out_features"))
        put(self, "bias", check_bool(bias, "bias"))
        put(self, "format", derived)
        put(self, "ranks", MappingProxyType(self._bond_sizes(rank)))

        sizes = dict(zip(self.expert_legs, dims, strict=True))
        sizes[INPUT] = self.in_features + int(bias)
        sizes[OUTPUT] = self.out_features
        sizes.update(self.ranks)
        put(self, "sizes", MappingProxyType(sizes))
        put(
            self,
            "_core_shapes",
            tuple(tuple(sizes[leg] for leg in legs) for legs in self.core_legs),
        )
        # Einsum symbols: the batch first, then every leg in order of appearance.
        legs = [*self.expert_legs, INPUT, OUTPUT, *self.bonds]
        put(self, "_symbol", {leg: opt_einsum.get_symbol(k + 1) for k, leg in enumerate(legs)})
        put(self, "_batch", opt_einsum.get_symbol(0))
        put(self, "planner", Planner(self, optimize=optimize, cache_size=cache_size,
                                     autotune=autotune))  # fmt: skip

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"Network is immutable: make a changed copy with network.replace({name}=...)"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Network is immutable")

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

    def replace(self, **changes: Any) -> Network:
        """A copy of this network with some constructor arguments changed.

        Parameters
        ----------
        **changes
            Any of ``spec``, ``expert_dims``, ``in_features``,
            ``out_features``, ``rank``, ``bias``, ``optimize``,
            ``cache_size``, ``autotune``.  The copy starts with an empty plan
            cache.

        Returns
        -------
        Network

        Raises
        ------
        TypeError
            For an argument that is not one of those.

        Examples
        --------
        >>> net = Network("n r, i r, o r", 8, 5, 2, rank=3)
        >>> net.replace(rank=4, bias=False).core_shapes
        ((8, 4), (5, 4), (2, 4))
        """
        unknown = sorted(set(changes) - set(_FIELDS))
        if unknown:
            raise TypeError(f"replace() got unknown arguments {unknown}; it takes {_FIELDS}")
        args = {**self._arguments(), **changes}
        return Network(args.pop("spec"), args.pop("expert_dims"), args.pop("in_features"),
                       args.pop("out_features"), **args)  # fmt: skip

    def _arguments(self) -> dict[str, Any]:
        dims = self.expert_dims[0] if self.n_levels == 1 else self.expert_dims
        return {
            "spec": self.spec, "expert_dims": dims, "in_features": self.in_features,
            "out_features": self.out_features, "rank": dict(self.ranks) or None,
            "bias": self.bias, "optimize": self.planner.optimize,
            "cache_size": self.planner.cache.maxsize, "autotune": self.planner.autotune,
        }  # fmt: skip

    @property
    def optimize(self) -> str | Sequence[tuple[int, ...]]:
        """The path optimiser of new plans (see :class:`~mumoe.planner.Planner`).

        Examples
        --------
        >>> Network("n r, i r, o r", 8, 5, 2, rank=3).optimize
        'flop-optimal'
        """
        return self.planner.optimize

    @property
    def autotune(self) -> bool:
        """Whether forward plans are timed and the fastest kept.

        Examples
        --------
        >>> Network("n r, i r, o r", 8, 5, 2, rank=3).autotune
        False
        """
        return self.planner.autotune

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
        return len(self.core_legs)

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
        return [*gates, self._term([INPUT], batch=True), *map(self._term, self.core_legs)]

    def _forward_shapes(self, batch_size: int) -> list[Shape]:
        # Operands of the forward contraction: gates, x (with its bias column), cores.
        shapes: list[Shape] = [(batch_size, n) for n in self.expert_dims]
        return [*shapes, (batch_size, self.sizes[INPUT]), *self.core_shapes]

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
        inputs += [" ".join(legs) for legs in self.core_legs]
        return ", ".join(inputs) + f" -> ...{OUTPUT}"

    # ------------------------------------------------------------------ plans

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
        return self.planner.cache

    def flops(self, batch_size: int = 1) -> int:
        """Floating-point operations of one forward pass over ``batch_size`` rows.

        Counts the contraction of gates, input and cores along the path the
        forward pass uses for this batch size (the autotuned one, once timed;
        see :meth:`Planner.chosen <mumoe.planner.Planner.chosen>`); a
        multiply-add counts as two.  The bias is included (the input leg
        counts :math:`I + 1` rows with a bias); computing the gates
        themselves (projection, normalisation, activation) is not.

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
        >>> Network("n r, i r, o r", 16, 8, 4, rank=3, bias=False).flops(batch_size=10)  # 2bR less
        1710
        """
        return self.planner.flops(positive_int(batch_size, "batch_size"))

    def describe(self, batch_size: int = 1) -> str:
        """A readable account of the network: sizes, cores, equation, path and costs.

        Written by :func:`mumoe.report.describe`.

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
        Network 'cp': 1 expert level, 8 experts, with bias
          spec        n1 r, i r, o r
          ...
          FLOPs       ... for batch 4
          ...
        """
        from mumoe.report import describe

        return describe(self, batch_size)

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
            f"{rank}, bias={self.bias})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its arguments: compiled plans are never pickled.
        args = self._arguments()
        positional = tuple(
            args.pop(k) for k in ("spec", "expert_dims", "in_features", "out_features")
        )
        return (_rebuild, (positional, args))


def _rebuild(positional: tuple[Any, ...], options: dict[str, Any]) -> Network:
    return Network(*positional, **options)
