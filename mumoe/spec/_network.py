r"""Declarative tensor networks that store the weight tensor of a μMoE layer.

A :class:`Network` is a spec (see :mod:`mumoe.spec`) plus sizes: the expert
dimensions :math:`N_1, \dots, N_E`, the input and output sizes :math:`I` and
:math:`O`, whether the input mode carries a bias slice, and the size (rank) of
every bond.  It knows the shape of each core, the parameter count and the
einsum equation of the factorised forward pass.  It is an immutable,
hashable value (change a size with :meth:`Network.replace`): equal
arguments give equal networks, and it holds no arrays, plans or caches.  The
cores are passed to the functions of :mod:`mumoe.functional`, so one network
serves NumPy, CuPy and PyTorch alike.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import opt_einsum

from mumoe.spec._formats import format_of, name_hint
from mumoe.spec._parse import parse_spec
from mumoe.spec._shapes import balanced_shape
from mumoe.typing import RankLike, Shape
from mumoe.validation import check_bool, positive_int, positive_ints

__all__ = ["Network"]

#: The constructor's arguments: what :meth:`Network.replace` changes and equality compares.
_FIELDS = (
    "spec",
    "in_features",
    "out_features",
    "expert_dims",
    "rank",
    "bias",
    "in_shape",
    "out_shape",
)


@functools.lru_cache(maxsize=256)
def _components(core_legs: tuple[tuple[str, ...], ...]) -> list[list[int]]:
    """The cores grouped by the legs they share (bonds and shared role legs)."""
    group = list(range(len(core_legs)))

    def root(k: int) -> int:
        while group[k] != k:
            group[k] = group[group[k]]
            k = group[k]
        return k

    first: dict[str, int] = {}
    for k, legs in enumerate(core_legs):
        for leg in legs:
            group[root(k)] = root(first.setdefault(leg, k))
    parts: dict[int, list[int]] = {}
    for k in range(len(core_legs)):
        parts.setdefault(root(k), []).append(k)
    return list(parts.values())


class Network:
    r"""A tensor network holding the weights of all experts of a μMoE layer.

    The network stores, in factorised form, the weight tensor
    :math:`\mathcal{W}` of shape ``(N_1, ..., N_E, I', O)`` with
    ``I' = I + 1`` when ``bias`` is true (the last input slice is the bias of
    every expert) and ``I' = I`` otherwise.  Networks are immutable and
    hashable, equal when their arguments are; :meth:`replace` makes a
    changed copy.  How a network is contracted (paths, plans) is the
    planning layer's: :func:`mumoe.plan.planner_of`.

    Parameters
    ----------
    spec : str
        The cores and their legs, e.g. ``"n r, i r, o r"``; see
        :func:`mumoe.spec.parse_spec`.
    in_features : int
        :math:`I`, the size of the input.
    out_features : int
        :math:`O`, the size of the output.
    expert_dims : int or sequence of int
        :math:`N_1, \dots, N_E`, the number of experts along each expert
        level; an int when there is one level.
    rank : int or mapping of str to int, optional
        The size of every bond: one int for all, or a mapping from bond name
        to size that names each bond.  Needed whenever the spec has bonds.
    bias : bool, default True
        Whether the input mode has an extra bias slice.
    in_shape, out_shape : sequence of int, optional
        The sizes of the legs ``i1, ..., iK`` (``o1, ..., oL``) that a spec
        splits the input (output) into; their product is ``in_features``
        (``out_features``), and ``x`` and ``y`` are reshaped to them
        row-major.  Needed exactly when the spec splits the mode.

    Raises
    ------
    ValueError
        If the spec is invalid (see :func:`~mumoe.spec.parse_spec`), a size
        is not positive, the number of expert dimensions does not match the
        expert legs, ``rank`` is missing or names a bond the spec lacks, or
        ``in_shape``/``out_shape`` is missing, has the wrong length or a
        product other than the size.
    TypeError
        If a size is not an integer or a flag not a bool.

    Notes
    -----
    With a split input, the bias slice is added to the first input leg:
    ``i1`` has size ``in_shape[0] + 1`` and the bias of expert :math:`n` is
    :math:`\mathcal{W}[n, i_1{=}I_1, 0, \dots, 0, :]` (the input is padded
    with a one there and zeros elsewhere in that slice).  So the bias stays
    inside the network, exact for every structure, at the cost of the
    other entries of that slice of ``W``, which multiply zeros (about a
    fraction ``1 / in_shape[0]`` of ``W``).  :attr:`weight_shape` and :func:`materialize
    <mumoe.functional.materialize>` give the matrix form ``(N..., I', O)``.

    Examples
    --------
    >>> net = Network("n r, i r, o r", 8, 4, expert_dims=16, rank=3)
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
    input_legs: tuple[str, ...]
    output_legs: tuple[str, ...]
    bonds: tuple[str, ...]
    expert_dims: tuple[int, ...]
    in_features: int
    out_features: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    bias: bool
    format: str
    ranks: Mapping[str, int]
    sizes: Mapping[str, int]
    symbols: Mapping[str, str]
    batch_symbol: str
    _core_shapes: tuple[Shape, ...]
    _hash: int
    _key: tuple[Any, ...]

    def __init__(
        self,
        spec: str,
        in_features: int,
        out_features: int,
        *,
        expert_dims: int | Sequence[int],
        rank: RankLike | None = None,
        bias: bool = True,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
    ) -> None:
        try:
            parsed = parse_spec(spec)
        except ValueError as error:
            raise ValueError(f"{error}{name_hint(spec)}") from None
        n_levels = len(parsed.expert_legs)
        dims = positive_ints(expert_dims, "expert_dims")
        if len(dims) != n_levels:
            raise ValueError(
                f"spec {parsed.spec!r} has {n_levels} expert level(s) "
                f"({', '.join(parsed.expert_legs)}) but expert_dims has {len(dims)} "
                f"entries: {dims}"
            )
        parts = _components(parsed.core_legs)
        if len(parts) > 1:
            shown = " and ".join("{" + ", ".join(map(str, part)) + "}" for part in parts)
            warnings.warn(
                f"spec {parsed.spec!r} is disconnected: no leg joins its cores {shown}, so "
                "W is an outer product of their tensors; a bond is probably missing or "
                "misspelt",
                UserWarning,
                stacklevel=2,
            )
        derived = format_of(parsed.spec, n_levels, len(parsed.input_legs), len(parsed.output_legs))
        put = object.__setattr__
        put(self, "spec", parsed.spec)
        put(self, "core_legs", parsed.core_legs)
        put(self, "expert_legs", parsed.expert_legs)
        put(self, "input_legs", parsed.input_legs)
        put(self, "output_legs", parsed.output_legs)
        put(self, "bonds", parsed.bonds)
        put(self, "expert_dims", dims)
        put(self, "in_features", positive_int(in_features, "in_features"))
        put(self, "out_features", positive_int(out_features, "out_features"))
        put(self, "in_shape", _leg_shape(in_shape, "in", parsed.input_legs, self.in_features))
        put(self, "out_shape", _leg_shape(out_shape, "out", parsed.output_legs, self.out_features))
        put(self, "bias", check_bool(bias, "bias"))
        put(self, "format", derived)
        put(self, "ranks", MappingProxyType(self._bond_sizes(rank)))

        sizes = dict(zip(self.expert_legs, dims, strict=True))
        sizes.update(zip(self.input_legs, self.in_shape, strict=True))
        sizes[self.input_legs[0]] += int(bias)
        sizes.update(zip(self.output_legs, self.out_shape, strict=True))
        sizes.update(self.ranks)
        put(self, "sizes", MappingProxyType(sizes))
        put(
            self,
            "_core_shapes",
            tuple(tuple(sizes[leg] for leg in legs) for legs in self.core_legs),
        )
        # Einsum symbols: the batch first, then every leg in order of appearance.
        legs = [*self.expert_legs, *self.input_legs, *self.output_legs, *self.bonds]
        symbols = {leg: opt_einsum.get_symbol(k + 1) for k, leg in enumerate(legs)}
        put(self, "symbols", MappingProxyType(symbols))
        put(self, "batch_symbol", opt_einsum.get_symbol(0))
        # Networks key plan caches on every call: the hash is computed once.
        # (The identity is kept as a plain tuple: comparing it reads no mapping proxy,
        # which torch.compile cannot trace after a dict was mutated.)
        put(self, "_key", self._identity())
        put(self, "_hash", hash(self._key))

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
            ``out_features``, ``rank``, ``bias``, ``in_shape``, ``out_shape``.

        Returns
        -------
        Network

        Raises
        ------
        TypeError
            For an argument that is not one of those.

        Examples
        --------
        >>> net = Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3)
        >>> net.replace(rank=4, bias=False).core_shapes
        ((8, 4), (5, 4), (2, 4))
        """
        unknown = sorted(set(changes) - set(_FIELDS))
        if unknown:
            raise TypeError(f"replace() got unknown arguments {unknown}; it takes {_FIELDS}")
        args = {**self._arguments(), **changes}
        return Network(args.pop("spec"), args.pop("in_features"), args.pop("out_features"), **args)

    def _arguments(self) -> dict[str, Any]:
        dims = self.expert_dims[0] if self.n_levels == 1 else self.expert_dims
        return {
            "spec": self.spec,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "expert_dims": dims,
            "rank": dict(self.ranks) or None,
            "bias": self.bias,
            "in_shape": self.in_shape if self.splits_input else None,
            "out_shape": self.out_shape if self.splits_output else None,
        }

    # ------------------------------------------------------------------ sizes

    @property
    def n_levels(self) -> int:
        """:math:`E`, the number of expert levels.

        Examples
        --------
        >>> Network("n1 a, n2 a, i a, o a", 5, 2, expert_dims=(4, 3), rank=2).n_levels
        2
        """
        return len(self.expert_legs)

    @property
    def n_experts(self) -> int:
        r""":math:`\prod_e N_e`, the total number of experts.

        Examples
        --------
        >>> Network("n1 a, n2 a, i a, o a", 5, 2, expert_dims=(4, 3), rank=2).n_experts
        12
        """
        return math.prod(self.expert_dims)

    @property
    def n_cores(self) -> int:
        """The number of cores.

        Examples
        --------
        >>> Network("n1 a, n2 a, i a, o a", 5, 2, expert_dims=(4, 3), rank=2).n_cores
        4
        """
        return len(self.core_legs)

    @property
    def weight_shape(self) -> Shape:
        """Shape of the dense weight tensor: ``(N_1, …, N_E, I', O)``.

        Examples
        --------
        >>> Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3).weight_shape  # I' = 5 + 1
        (8, 6, 2)
        """
        return (*self.expert_dims, self.in_features + int(self.bias), self.out_features)

    @property
    def tensor_shape(self) -> Shape:
        """Shape of ``W`` as the network holds it: experts, then every input and output leg.

        ``(N_1, ..., N_E, I', O)`` (:attr:`weight_shape`) unless the spec
        splits the input or output; then one entry per leg, the bias slice
        on the first input leg.

        Examples
        --------
        >>> net = Network("n r0, r0 i1 o1 r1, r1 i2 o2", 12, 6, expert_dims=8, rank=2,
        ...               in_shape=(4, 3), out_shape=(3, 2))
        >>> net.tensor_shape, net.weight_shape
        ((8, 5, 3, 3, 2), (8, 13, 6))
        """
        return (*self.expert_dims, *self.input_sizes, *self.output_sizes)

    @property
    def input_sizes(self) -> Shape:
        """The sizes of the input legs, the bias slice included: the input operand's shape.

        Examples
        --------
        >>> net = Network("n r, i1 r, i2 r, o r", 6, 2, expert_dims=4, rank=2, in_shape=(3, 2))
        >>> net.input_sizes
        (4, 2)
        """
        return tuple(self.sizes[leg] for leg in self.input_legs)

    @property
    def output_sizes(self) -> Shape:
        """The sizes of the output legs (:attr:`out_shape`).

        Examples
        --------
        >>> net = Network("n r, i r, o1 r, o2 r", 6, 4, expert_dims=4, rank=2, out_shape=(2, 2))
        >>> net.output_sizes
        (2, 2)
        """
        return self.out_shape

    @property
    def splits_input(self) -> bool:
        """Whether the spec splits the input into several legs (``i1``, ``i2``, ...).

        Examples
        --------
        >>> Network("n r, i r, o r", 6, 4, expert_dims=4, rank=2).splits_input
        False
        """
        return len(self.input_legs) > 1

    @property
    def splits_output(self) -> bool:
        """Whether the spec splits the output into several legs (``o1``, ``o2``, ...).

        Examples
        --------
        >>> net = Network("n r, i r, o1 r, o2 r", 6, 4, expert_dims=4, rank=2, out_shape=(2, 2))
        >>> net.splits_output
        True
        """
        return len(self.output_legs) > 1

    @property
    def splits(self) -> bool:
        """Whether the spec splits the input or the output (then ``tensor_shape != weight_shape``).

        Examples
        --------
        >>> Network("n r, i1 r, i2 r, o r", 6, 4, expert_dims=4, rank=2, in_shape=(3, 2)).splits
        True
        """
        return self.splits_input or self.splits_output

    @property
    def core_shapes(self) -> tuple[Shape, ...]:
        """The shape of each core, its legs in spec order.

        Examples
        --------
        >>> Network("r0 n r1, r1 i r2, r2 o r0", 5, 2, expert_dims=8, rank=3).core_shapes
        ((3, 8, 3), (3, 6, 3), (3, 2, 3))
        """
        return self._core_shapes

    @property
    def n_params(self) -> int:
        """The number of parameters of all cores together.

        Examples
        --------
        >>> Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3).n_params  # 3 * (8 + 6 + 2)
        48
        """
        return sum(math.prod(shape) for shape in self.core_shapes)

    @property
    def n_dense_params(self) -> int:
        """The number of entries of the dense weight tensor ``W``.

        Examples
        --------
        >>> Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3).n_dense_params  # 8 * 6 * 2
        96
        """
        return math.prod(self.weight_shape)

    # -------------------------------------------------------------- equations

    def term(self, legs: Sequence[str], batch: bool = False) -> str:
        """The einsum term of ``legs`` in this network's symbols, the batch symbol first if asked.

        Parameters
        ----------
        legs : sequence of str
            Leg names of this network (expert legs, ``"i"``, ``"o"``, bonds).
        batch : bool, default False
            Whether the term starts with :attr:`batch_symbol`.

        Returns
        -------
        str

        Examples
        --------
        >>> net = Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3)
        >>> net.term(["n1", "r"]), net.term(["i"], batch=True)
        ('be', 'ac')
        """
        symbols = self.symbols
        return (self.batch_symbol if batch else "") + "".join(symbols[leg] for leg in legs)

    def forward_shapes(self, batch_size: int) -> list[Shape]:
        """The operand shapes of the forward contraction: gates, input, cores.

        Parameters
        ----------
        batch_size : int
            Rows of the gates and of the input (with its bias column).

        Returns
        -------
        list of tuple of int
            ``(B, N_e)`` per level, ``(B, I')`` (``(B, *input_sizes)`` for a
            split input), then :attr:`core_shapes`.

        Examples
        --------
        >>> Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3).forward_shapes(4)
        [(4, 8), (4, 6), (8, 3), (6, 3), (2, 3)]
        """
        shapes: list[Shape] = [(batch_size, n) for n in self.expert_dims]
        return [*shapes, (batch_size, *self.input_sizes), *self.core_shapes]

    @property
    def einsum_equation(self) -> str:
        """The factorised forward pass as one einsum over gates, input and cores.

        Operands in order: the gates ``(batch, N_e)``, the input
        ``(batch, I')`` and the cores; output ``(batch, O)``.  A split input
        or output has one symbol per leg (``(batch, *input_sizes)``,
        ``(batch, *out_shape)``).  The symbols are opt_einsum's
        (:attr:`symbols`, the batch :attr:`batch_symbol`).

        Examples
        --------
        >>> Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3).einsum_equation
        'ab,ac,be,ce,de->ad'
        """
        gates = [self.term([leg], batch=True) for leg in self.expert_legs]
        operands = [*gates, self.term(self.input_legs, batch=True), *map(self.term, self.core_legs)]
        return ",".join(operands) + "->" + self.term(self.output_legs, batch=True)

    @property
    def materialize_equation(self) -> str:
        """The contraction of every core into ``W`` (:attr:`tensor_shape`), as one einsum.

        Examples
        --------
        >>> Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3).materialize_equation
        'be,ce,de->bcd'
        """
        output = self.term([*self.expert_legs, *self.input_legs, *self.output_legs])
        return ",".join(map(self.term, self.core_legs)) + "->" + output

    @property
    def expert_core_legs(self) -> tuple[tuple[str, ...], ...]:
        """Each core's legs once the expert legs are indexed away (one expert's cores).

        Examples
        --------
        >>> Network("r0 n r1, r1 i r2, r2 o r0", 5, 2, expert_dims=8, rank=3).expert_core_legs
        (('r0', 'r1'), ('r1', 'i', 'r2'), ('r2', 'o', 'r0'))
        """
        experts = set(self.expert_legs)
        return tuple(tuple(leg for leg in legs if leg not in experts) for legs in self.core_legs)

    @property
    def expert_equation(self) -> str:
        """The contraction of one expert's cores (:attr:`expert_core_legs`) into its role legs.

        Examples
        --------
        >>> Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3).expert_equation
        'e,ce,de->cd'
        """
        inputs = ",".join(map(self.term, self.expert_core_legs))
        return inputs + "->" + self.term([*self.input_legs, *self.output_legs])

    @property
    def equation(self) -> str:
        """The factorised forward pass in the spec's own leg names.

        ``...`` stands for the batch dimensions.

        Examples
        --------
        >>> Network("n r, i r, o r", 8, 4, expert_dims=16, rank=3).equation
        '...n1, ...i, n1 r, i r, o r -> ...o'
        """
        inputs = [f"...{leg}" for leg in self.expert_legs]
        inputs.append("..." + " ".join(self.input_legs))
        inputs += [" ".join(legs) for legs in self.core_legs]
        return ", ".join(inputs) + " -> ..." + " ".join(self.output_legs)

    # ------------------------------------------------------- identity, pickle

    def _identity(self) -> tuple[Any, ...]:
        return (
            self.spec,
            self.expert_dims,
            self.in_features,
            self.out_features,
            tuple(self.ranks.items()),
            self.bias,
            self.in_shape,
            self.out_shape,
        )

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if not isinstance(other, Network):
            return NotImplemented
        return self._hash == other._hash and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        args = self._arguments()
        rank = f", rank={args['rank']}" if args["rank"] else ""
        shapes = "".join(
            f", {name}={args[name]}" for name in ("in_shape", "out_shape") if args[name]
        )
        return (
            f"Network({self.spec!r}, {self.in_features}, {self.out_features}, "
            f"expert_dims={args['expert_dims']}{rank}, bias={self.bias}{shapes})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its arguments (the hash of a string differs between processes).
        args = self._arguments()
        return (
            _rebuild,
            ((args.pop("spec"), args.pop("in_features"), args.pop("out_features")), args),
        )


def _leg_shape(shape: Sequence[int] | None, role: str, legs: tuple[str, ...], size: int) -> Shape:
    # The sizes of a mode's legs: (size,) for an unsplit mode, else given, one per leg,
    # multiplying to the mode's size.
    name = f"{role}_shape"
    features = f"{role}_features"
    if len(legs) == 1:
        if shape is not None and tuple(positive_ints(shape, name)) != (size,):
            raise ValueError(
                f"{name}={tuple(shape)!r} splits the {role}put, but the spec has one {role}put "
                f"leg {legs[0]!r} (of size {features}={size}); name the legs "
                f"{', '.join(f'{legs[0][0]}{k}' for k in range(1, len(tuple(shape)) + 1))} to "
                "split it"
            )
        return (size,)
    if shape is None:
        raise ValueError(
            f"the spec splits the {role}put into legs {', '.join(legs)}, so it needs "
            f"{name}=<{len(legs)} sizes whose product is {features}={size}>"
            f"{_suggestion(size, len(legs))}"
        )
    sizes = positive_ints(shape, name)
    if len(sizes) != len(legs):
        raise ValueError(
            f"{name}={sizes} has {len(sizes)} sizes but the spec splits the {role}put into "
            f"{len(legs)} legs ({', '.join(legs)})"
        )
    if math.prod(sizes) != size:
        raise ValueError(
            f"{name}={sizes} multiplies to {math.prod(sizes)}, not {features}={size}"
            f"{_suggestion(size, len(legs))}"
        )
    return sizes


def _suggestion(size: int, n_legs: int) -> str:
    try:
        return f" (balanced: {balanced_shape(size, n_legs)})"
    except ValueError:
        return ""


def _rebuild(positional: tuple[Any, ...], options: dict[str, Any]) -> Network:
    return Network(*positional, **options)
