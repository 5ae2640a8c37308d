r"""The registry of factorisation formats: one record per format, all it knows in one place.

A :class:`Format` holds everything mumoe knows about one factorisation of
the weight tensor :math:`\mathcal{W}` of shape ``(N_1, ..., N_E, I', O)``:

* ``core_legs(E, K, L)`` — the legs of each core for :math:`E` expert levels
  and the input and output split into :math:`K` and :math:`L` legs (1 and 1
  by default), in the reference mode order (experts, input, output);
* ``bond_sizes(rank, E, K, L)`` — the rank validator: a user's ``rank``
  checked and turned into one size per bond;
* ``init(core_legs, sizes, in_features)`` — the default initialisation of
  each core, as data (:class:`Normal`, :class:`Uniform`, :class:`Constant`,
  :class:`DiagonalSlices`) that :func:`mumoe.nn.init_cores_` applies to torch
  tensors; it reads the network's shapes (each core's legs, every leg's
  size), not the network;
* ``free_rank(E, expert_rank, r, K, L)`` — the budget hook: which one
  integer a parameter budget solves for (:func:`mumoe.spec.match_rank`);
* ``label`` — the name in prose.

Everything that depends on the format reads :data:`FORMATS`, so adding a
format is one record here plus its tests and theory page.  With
:math:`d = E + 2` modes of sizes :math:`D_1, \dots, D_d`:

========  ==================================  =============================================
format    spec (E = 1)                        parameters
========  ==================================  =============================================
dense     ``n1 i o``                          :math:`\prod_k D_k`
cp        ``n1 r, i r, o r``                  :math:`R \sum_k D_k`
tucker    ``n1 r1, i ri, o ro, r1 ri ro``     :math:`\sum_k D_k R_k + \prod_k R_k`
tt        ``n1 r1, r1 i r2, r2 o``            :math:`\sum_k R_{k-1} D_k R_k`, :math:`R_0 = R_d = 1`
tr        ``r0 n1 r1, r1 i r2, r2 o r0``      :math:`\sum_k R_{k-1} D_k R_k`, :math:`R_d = R_0`
ttm       ``n1 r1, r1 i1 o1 r2, r2 i2 o2``    :math:`N R_1 + \sum_k R_k I_k O_k R_{k+1}` (K = L = 2)
mxd       ``n1 o, i o``                       :math:`O (\sum_e N_e + I')`
lowrank   ``n1 i r, n1 o r``                  :math:`R \prod_e N_e (I' + O)`
========  ==================================  =============================================

``mxd`` is the Hadamard factorisation of Mixture of Decoders (Oldfield et al.,
2025): :math:`\mathcal{W}[n, i, o] = C[n, o] D[i, o]`, the output leg an open
hyperedge shared by every core; ``lowrank`` gives every expert its own rank-:math:`R`
matrix :math:`U_n V_n^\top` (the expert legs shared by both cores).

Every format splits the input and output the same way: each mode of the
table becomes its legs (``i1 r, i2 r`` in CP, one factor each; a chain link
each in TT and TR; one factor and bond each in Tucker).  ``ttm`` is the
TT-matrix (tensorly-torch's BlockTT): a chain of expert cores, then one core
per pair of input and output legs, so it needs :math:`K = L`; with
:math:`K = L = 1` its last core holds the whole matrix.  Split networks of
every format start from :func:`custom_init`.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mumoe.spec._parse import INPUT, OUTPUT, is_expert_leg, is_role_leg
from mumoe.spec._ranks import (
    validate_cp_rank,
    validate_tr_rank,
    validate_tt_rank,
    validate_tucker_rank,
)
from mumoe.typing import Rank
from mumoe.validation import positive_int

__all__ = [
    "FORMATS",
    "Constant",
    "DiagonalSlices",
    "Format",
    "Normal",
    "Uniform",
    "custom_init",
    "format_of",
    "validate_cp_rank",
    "validate_tr_rank",
    "validate_tt_rank",
    "validate_tucker_rank",
]

Legs = tuple[tuple[str, ...], ...]
Sizes = Mapping[str, int]


# ------------------------------------------------------------ initialisation


@dataclass(frozen=True)
class Normal:
    r"""Every entry drawn from :math:`\mathcal{N}(\mathrm{mean}, \mathrm{std}^2)`.

    Parameters
    ----------
    mean, std : float

    Examples
    --------
    >>> Normal(1.0, 1.0)
    Normal(mean=1.0, std=1.0)
    """

    mean: float
    std: float


@dataclass(frozen=True)
class Uniform:
    r"""Every entry drawn from :math:`\mathcal{U}(-\mathrm{bound}, \mathrm{bound})`.

    Parameters
    ----------
    bound : float

    Examples
    --------
    >>> Uniform.fan_in(4)
    Uniform(bound=0.5)
    """

    bound: float

    @classmethod
    def fan_in(cls, fan_in: int) -> Uniform:
        r""":math:`\mathcal{U}(\pm\sqrt{1/\mathrm{fan\_in}})`, as ``nn.Linear``.

        Parameters
        ----------
        fan_in : int

        Returns
        -------
        Uniform

        Examples
        --------
        >>> Uniform.fan_in(16).bound
        0.25
        """
        return cls(math.sqrt(1.0 / fan_in))


@dataclass(frozen=True)
class Constant:
    r"""Every entry equal to ``value``.

    Parameters
    ----------
    value : float

    Examples
    --------
    >>> Constant(1.0)
    Constant(value=1.0)
    """

    value: float


@dataclass(frozen=True)
class DiagonalSlices:
    r"""An expert core whose every slice along the expert leg is diagonal.

    The core is read as ``(left, N, right)`` around its expert leg at
    ``axis`` (a missing side has size 1); slice ``n`` is the ``(left,
    right)`` identity with its diagonal drawn from :math:`\mathcal{N}(1,
    \mathrm{std}^2)`.  The reference's TR initialisation.

    Parameters
    ----------
    axis : int
        The position of the expert leg in the core.
    std : float

    Examples
    --------
    >>> DiagonalSlices(axis=1, std=1.0)
    DiagonalSlices(axis=1, std=1.0)
    """

    axis: int
    std: float


CoreInit = Normal | Uniform | Constant | DiagonalSlices


def _expert_factor(level: int) -> CoreInit:
    # CP and Tucker expert factors: N(1, 1) for the first level, ones after.
    return Normal(1.0, 1.0) if level == 0 else Constant(1.0)


def custom_init(core_legs: Legs, sizes: Sizes, in_features: int) -> list[CoreInit]:
    r"""Every core :math:`\mathcal{N}(0, \sigma^2)`: ``W`` gets entries of variance ``1/(3I)``.

    :math:`\sigma = (1 / (3 I \prod_b R_b))^{1/(2K)}` for :math:`K` cores, the
    variance of an ``nn.Linear`` weight, as :func:`mumoe.random_cores` does.

    Parameters
    ----------
    core_legs : tuple of tuple of str
        The legs of each core (:attr:`Network.core_legs <mumoe.Network.core_legs>`).
    sizes : mapping of str to int
        Every leg's size (:attr:`Network.sizes <mumoe.Network.sizes>`).
    in_features : int
        :math:`I`, without the bias.

    Returns
    -------
    list of Normal, one per core

    Examples
    --------
    >>> from mumoe import Network
    >>> net = Network("n i r, r o", 3, 2, expert_dims=4, rank=1)
    >>> custom_init(net.core_legs, net.sizes, net.in_features)[0].std  # doctest: +ELLIPSIS
    0.577...
    """
    variance = 1.0 / (3 * in_features)
    n_terms = math.prod(sizes[bond] for bond in _bonds(core_legs))
    scale = (variance / n_terms) ** (1.0 / (2 * len(core_legs)))
    return [Normal(0.0, scale)] * len(core_legs)


def _bonds(core_legs: Legs) -> list[str]:
    # Every leg that is not a role (n1.., i.., o..), once: the summed bonds.
    legs = dict.fromkeys(leg for core in core_legs for leg in core)
    return [leg for leg in legs if not is_role_leg(leg)]


def _n_levels(core_legs: Legs) -> int:
    return len({leg for core in core_legs for leg in core if is_expert_leg(leg)})


# ------------------------------------------------------------------ formats


def _role_legs(role: str, count: int) -> list[str]:
    # 'i' for one leg, 'i1', ..., 'iK' for several (the spec language's names).
    return [role] if count == 1 else [f"{role}{k}" for k in range(1, count + 1)]


def _modes(n_levels: int, n_in: int = 1, n_out: int = 1) -> list[str]:
    experts = [f"n{e}" for e in range(1, n_levels + 1)]
    return [*experts, *_role_legs(INPUT, n_in), *_role_legs(OUTPUT, n_out)]


def _dense_legs(n_levels: int, n_in: int = 1, n_out: int = 1) -> Legs:
    return (tuple(_modes(n_levels, n_in, n_out)),)


def _dense_init(core_legs: Legs, sizes: Sizes, in_features: int) -> list[CoreInit]:
    return [Uniform.fan_in(in_features)]


def _cp_legs(n_levels: int, n_in: int = 1, n_out: int = 1) -> Legs:
    return tuple((mode, "r") for mode in _modes(n_levels, n_in, n_out))


def _cp_bonds(rank: Any, n_levels: int, n_in: int = 1, n_out: int = 1) -> dict[str, int]:
    return {"r": validate_cp_rank(rank)}


def _cp_init(core_legs: Legs, sizes: Sizes, in_features: int) -> list[CoreInit]:
    # Experts ~ the first level N(1, 1), ones after; input U(±sqrt(1/I)); output U(±sqrt(1/R)).
    experts = [_expert_factor(level) for level in range(_n_levels(core_legs))]
    return [*experts, Uniform.fan_in(in_features), Uniform.fan_in(sizes["r"])]


def _tucker_bonds_names(n_levels: int, n_in: int = 1, n_out: int = 1) -> list[str]:
    roles = _role_legs(INPUT, n_in) + _role_legs(OUTPUT, n_out)
    return [f"r{e}" for e in range(1, n_levels + 1)] + [f"r{leg}" for leg in roles]


def _tucker_legs(n_levels: int, n_in: int = 1, n_out: int = 1) -> Legs:
    bonds = _tucker_bonds_names(n_levels, n_in, n_out)
    modes = _modes(n_levels, n_in, n_out)
    factors = tuple((mode, bond) for mode, bond in zip(modes, bonds, strict=True))
    return (*factors, tuple(bonds))


def _tucker_bonds(rank: Any, n_levels: int, n_in: int = 1, n_out: int = 1) -> dict[str, int]:
    ranks = validate_tucker_rank(rank, n_levels + n_in + n_out)
    return dict(zip(_tucker_bonds_names(n_levels, n_in, n_out), ranks, strict=True))


def _tucker_init(core_legs: Legs, sizes: Sizes, in_features: int) -> list[CoreInit]:
    # The core U(±c), c = 3 / sqrt(R_I prod_e m_e R_e), m_1 = 2 and m_{e>1} = 1 (the
    # mean squares of the expert factors): each expert's matrix then has entries of
    # variance 1/(3I), that of an nn.Linear weight.
    levels = _n_levels(core_legs)
    mass = math.prod((2 if level == 0 else 1) * sizes[f"r{level + 1}"] for level in range(levels))
    return [
        *(_expert_factor(level) for level in range(levels)),
        Uniform.fan_in(in_features),
        Uniform.fan_in(sizes["ro"]),
        Uniform(3.0 / math.sqrt(sizes["ri"] * mass)),
    ]


def _tt_legs(n_levels: int, n_in: int = 1, n_out: int = 1) -> Legs:
    return _chain(_modes(n_levels, n_in, n_out))


def _chain(modes: list[str]) -> Legs:
    # An open chain of cores, one mode (or a group of modes, 'i1 o1') each: r{k} joins
    # core k - 1 to core k.
    d = len(modes)
    return tuple(
        (*([f"r{k}"] if k > 0 else []), *mode.split(), *([f"r{k + 1}"] if k < d - 1 else []))
        for k, mode in enumerate(modes)
    )


def _tt_bonds(rank: Any, n_levels: int, n_in: int = 1, n_out: int = 1) -> dict[str, int]:
    d = n_levels + n_in + n_out
    ranks = validate_tt_rank(rank, d)
    return {f"r{k}": ranks[k] for k in range(1, d)}


def _ttm_pairs(n_levels: int, n_in: int, n_out: int) -> list[str]:
    # The TT-matrix's modes: the expert legs, then the input and output legs in pairs.
    if n_in != n_out:
        raise ValueError(
            f"a TT-matrix pairs each input leg with an output leg: in_shape and out_shape need "
            f"the same length, got {n_in} input and {n_out} output legs"
        )
    pairs = zip(_role_legs(INPUT, n_in), _role_legs(OUTPUT, n_out), strict=True)
    return [*(f"n{e}" for e in range(1, n_levels + 1)), *(f"{i} {o}" for i, o in pairs)]


def _ttm_legs(n_levels: int, n_in: int = 1, n_out: int = 1) -> Legs:
    # n1 r1, ..., r{E} i1 o1 r{E+1}, ..., r{E+K-1} iK oK: the expert chain, then the
    # TT-matrix (BlockTT) cores, each holding one input and one output leg.
    return _chain(_ttm_pairs(n_levels, n_in, n_out))


def _ttm_bonds(rank: Any, n_levels: int, n_in: int = 1, n_out: int = 1) -> dict[str, int]:
    d = len(_ttm_pairs(n_levels, n_in, n_out))
    ranks = validate_tt_rank(rank, d)
    return {f"r{k}": ranks[k] for k in range(1, d)}


def _tr_legs(n_levels: int, n_in: int = 1, n_out: int = 1) -> Legs:
    modes = _modes(n_levels, n_in, n_out)
    return tuple((f"r{k}", mode, f"r{(k + 1) % len(modes)}") for k, mode in enumerate(modes))


def _tr_bonds(rank: Any, n_levels: int, n_in: int = 1, n_out: int = 1) -> dict[str, int]:
    d = n_levels + n_in + n_out
    ranks = validate_tr_rank(rank, d)
    return {f"r{k}": ranks[k] for k in range(d)}


def _mxd_legs(n_levels: int, n_in: int = 1, n_out: int = 1) -> Legs:
    # W[n1, ..., nE, i, o] = C1[n1, o] ... CE[nE, o] D[i, o]: the output leg shared, open.
    outputs = _role_legs(OUTPUT, n_out)
    experts = ((f"n{e}", *outputs) for e in range(1, n_levels + 1))
    return (*experts, (*_role_legs(INPUT, n_in), *outputs))


def _no_bonds(name: str) -> Callable[..., dict[str, int]]:
    def bond_sizes(rank: Any, n_levels: int, n_in: int = 1, n_out: int = 1) -> dict[str, int]:
        if rank is not None:
            raise ValueError(f"the {name} format has no rank, got rank={rank!r}")
        return {}

    return bond_sizes


def _mxd_init(core_legs: Legs, sizes: Sizes, in_features: int) -> list[CoreInit]:
    # The first level's C ~ N(1/sqrt2, 1/2), so that E[C^2] = 1 and experts differ by
    # scale (as CP's N(1, 1)), later levels ones, D ~ U(±sqrt(1/I)): every entry of W
    # then has the variance 1/(3I) of an nn.Linear weight.
    half = math.sqrt(0.5)
    levels = _n_levels(core_legs)
    experts = [Normal(half, half) if level == 0 else Constant(1.0) for level in range(levels)]
    return [*experts, Uniform.fan_in(in_features)]


def _lowrank_legs(n_levels: int, n_in: int = 1, n_out: int = 1) -> Legs:
    # W[n1, ..., nE] = U[n1, ..., nE] V[n1, ..., nE]^T: every expert its own rank-R matrix.
    experts = tuple(f"n{e}" for e in range(1, n_levels + 1))
    inputs, outputs = _role_legs(INPUT, n_in), _role_legs(OUTPUT, n_out)
    return ((*experts, *inputs, "r"), (*experts, *outputs, "r"))


def _lowrank_bonds(rank: Any, n_levels: int, n_in: int = 1, n_out: int = 1) -> dict[str, int]:
    return {"r": positive_int(rank, "lowrank rank")}


def _chain_init(core_legs: Legs, sizes: Sizes, in_features: int) -> list[CoreInit]:
    # TR (and TT, whose boundary cores lack their size-1 bond): diagonal expert
    # slices N(1, v), v = 1 for the first level and 0 after; input U(±sqrt(1/I));
    # output U(±sqrt(1/fan)), fan the product of its bonds.
    levels = _n_levels(core_legs)
    experts = [
        DiagonalSlices(axis=legs.index(f"n{level + 1}"), std=1.0 if level == 0 else 0.0)
        for level, legs in enumerate(core_legs[:levels])
    ]
    fan = math.prod(sizes[leg] for leg in core_legs[-1] if leg != OUTPUT)
    return [*experts, Uniform.fan_in(in_features), Uniform.fan_in(fan)]


@dataclass(frozen=True)
class Format:
    """One factorisation format: its structure, ranks, initialisation and budget hook.

    Parameters
    ----------
    name : str
        The format's name (``"cp"``): the preset, ``Network.format``, the
        ``network=`` argument of the layers.
    label : str
        Its name in prose (``"CP"``).
    core_legs : callable
        ``core_legs(E, K=1, L=1)``: the legs of each core for ``E`` expert
        levels, the input split into ``K`` legs and the output into ``L``.
    bond_sizes : callable
        ``bond_sizes(rank, E, K=1, L=1)``: the rank validator; returns one
        size per bond (an empty dict for a format without rank).
    init : callable
        ``init(core_legs, sizes, in_features)``: the default initialisation
        of each core, read from the network's shapes (see :func:`custom_init`).
    free_rank : callable or None
        The budget hook ``free_rank(E, expert_rank, r, K, L)``: the ``rank``
        with one free integer ``r``, bonds that touch expert cores fixed at
        ``expert_rank`` (None: no rank to solve for).

    Examples
    --------
    >>> FORMATS["tt"].spec(2)
    'n1 r1, r1 n2 r2, r2 i r3, r3 o'
    """

    name: str
    label: str
    core_legs: Callable[..., Legs]
    bond_sizes: Callable[..., dict[str, int]]
    init: Callable[[Legs, Sizes, int], list[CoreInit]]
    free_rank: Callable[[int, int, int, int, int], Rank] | None

    def spec(self, n_levels: int, n_in: int = 1, n_out: int = 1) -> str:
        """The canonical spec of this format for ``n_levels`` expert levels.

        Parameters
        ----------
        n_levels : int
        n_in, n_out : int, default 1
            The legs the input and output are split into.

        Returns
        -------
        str

        Raises
        ------
        ValueError
            If the format cannot split the modes so (a TT-matrix needs
            ``n_in == n_out``).

        Examples
        --------
        >>> FORMATS["cp"].spec(1)
        'n1 r, i r, o r'
        >>> FORMATS["ttm"].spec(1, 2, 2)
        'n1 r1, r1 i1 o1 r2, r2 i2 o2'
        """
        return _spec(self.name, n_levels, n_in, n_out)

    @property
    def has_rank(self) -> bool:
        """Whether the format has bonds, hence a ``rank``.

        Examples
        --------
        >>> FORMATS["dense"].has_rank, FORMATS["cp"].has_rank
        (False, True)
        """
        return self.free_rank is not None


@functools.lru_cache(maxsize=256)
def _spec(name: str, n_levels: int, n_in: int = 1, n_out: int = 1) -> str:
    return ", ".join(" ".join(legs) for legs in FORMATS[name].core_legs(n_levels, n_in, n_out))


#: The formats by name; the presets of :mod:`mumoe.spec` are built from them.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("dense", "dense", _dense_legs, _no_bonds("dense"), _dense_init, None),
        Format(
            "cp",
            "CP",
            _cp_legs,
            _cp_bonds,
            _cp_init,
            lambda levels, expert_rank, r, n_in, n_out: r,
        ),
        Format(
            "tucker",
            "Tucker",
            _tucker_legs,
            _tucker_bonds,
            _tucker_init,
            lambda levels, expert_rank, r, n_in, n_out: (
                (expert_rank,) * levels + (r,) * (n_in + n_out)
            ),
        ),
        Format(
            "tt",
            "TT",
            _tt_legs,
            _tt_bonds,
            _chain_init,
            lambda levels, expert_rank, r, n_in, n_out: (
                (expert_rank,) * levels + (r,) * (n_in + n_out - 1)
            ),
        ),
        Format(
            "tr",
            "TR",
            _tr_legs,
            _tr_bonds,
            _chain_init,
            lambda levels, expert_rank, r, n_in, n_out: (
                (expert_rank,) * (levels + 1) + (r,) * (n_in + n_out - 1)
            ),
        ),
        Format(
            "ttm",
            "TT-matrix",
            _ttm_legs,
            _ttm_bonds,
            custom_init,
            lambda levels, expert_rank, r, n_in, n_out: (expert_rank,) * levels + (r,) * (n_in - 1),
        ),
        Format("mxd", "MxD", _mxd_legs, _no_bonds("mxd"), _mxd_init, None),
        Format(
            "lowrank",
            "per-expert low-rank",
            _lowrank_legs,
            _lowrank_bonds,
            custom_init,
            lambda levels, expert_rank, r, n_in, n_out: r,
        ),
    )
}


def name_hint(name: str) -> str:
    """A hint for a one-word string that is not a spec: the format it names or resembles.

    Parameters
    ----------
    name : str

    Returns
    -------
    str
        ``""`` for a string of several words, else a sentence to append to an
        error message.

    Examples
    --------
    >>> name_hint("cp")
    "; 'cp' is a format name: mumoe.preset('cp', ...) builds its network (spec 'n1 r, i r, o r')"
    >>> name_hint("cpp")
    "; it is not a format name either (did you mean 'cp'?)"
    """
    if len(name.split()) != 1 or "," in name:
        return ""
    if name in FORMATS:
        legs = (2, 2) if name == "ttm" else (1, 1)  # a TT-matrix splits both modes by default
        return (
            f"; {name!r} is a format name: mumoe.preset({name!r}, ...) builds its network "
            f"(spec {_spec(name, 1, *legs)!r})"
        )
    close = difflib.get_close_matches(name.lower(), FORMATS, n=1)
    suggestion = f"did you mean {close[0]!r}?" if close else f"choose one of {_names()}"
    return f"; it is not a format name either ({suggestion})"


def _names() -> str:
    return ", ".join(map(repr, FORMATS))


def format_of(spec: str, n_levels: int, n_in: int = 1, n_out: int = 1) -> str:
    """The format whose canonical spec ``spec`` is, or ``"custom"``.

    Parameters
    ----------
    spec : str
        A canonical spec (:attr:`mumoe.spec.ParsedSpec.spec`).
    n_levels : int
    n_in, n_out : int, default 1
        The legs its input and output are split into.

    Returns
    -------
    str

    Examples
    --------
    >>> format_of("n1 r, i r, o r", 1), format_of("n1 i r, r o", 1)
    ('cp', 'custom')
    >>> format_of("n1 r, i1 r, i2 r, o r", 1, 2, 1)
    'cp'
    """
    for name in FORMATS:
        try:
            if _spec(name, n_levels, n_in, n_out) == spec:
                return name
        except ValueError:  # a format that cannot split the modes so (ttm)
            continue
    return "custom"
