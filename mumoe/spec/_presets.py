r"""Networks for the standard factorisations, for any number of expert levels.

Each preset writes the spec of one format of :data:`mumoe.spec.FORMATS`
(whose :class:`~mumoe.spec.Format` documentation tables the specs and
parameter counts), with its modes in the reference order (experts, input,
output), and returns a :class:`~mumoe.spec.Network`.  Every preset takes the
sizes as ``nn.Linear`` does, ``(in_features, out_features)``, and the experts
by keyword, ``expert_dims=``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

from mumoe.spec._formats import FORMATS
from mumoe.spec._network import Network
from mumoe.spec._ranks import (
    validate_cp_rank,
    validate_tr_rank,
    validate_tt_rank,
    validate_tucker_rank,
)
from mumoe.spec._shapes import balanced_shape
from mumoe.typing import Rank
from mumoe.validation import positive_ints

__all__ = [
    "PRESETS",
    "cp",
    "dense",
    "lowrank",
    "mxd",
    "preset",
    "preset_format",
    "tr",
    "tt",
    "ttm",
    "ttm_shapes",
    "tucker",
    "validate_cp_rank",
    "validate_tr_rank",
    "validate_tt_rank",
    "validate_tucker_rank",
]


def _build(
    format: str,
    in_features: int,
    out_features: int,
    expert_dims: int | Sequence[int],
    rank: Rank | None,
    **options: Any,
) -> Network:
    record = FORMATS[format]
    dims = positive_ints(expert_dims, "expert_dims")
    legs = [
        1 if options.get(name) is None else len(positive_ints(options[name], name))
        for name in _SHAPES
    ]
    bonds = record.bond_sizes(rank, len(dims), *legs)
    spec = record.spec(len(dims), *legs)
    return Network(spec, in_features, out_features, expert_dims=dims, rank=bonds or None, **options)


_SHAPES = ("in_shape", "out_shape")


def dense(
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    bias: bool = True,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    r"""The unfactorised weight: one core of shape ``(N_1, ..., N_E, I', O)``.

    Parameters
    ----------
    in_features, out_features : int
        :math:`I` and :math:`O`.
    expert_dims : int or sequence of int
        Experts per level, :math:`N_1, \dots, N_E`.
    bias : bool, default True
        Whether the input mode has a bias slice (:math:`I' = I + 1`).
    in_shape, out_shape : sequence of int, optional
        Split the input (output) into legs of these sizes, each a mode of
        its own (see :class:`~mumoe.spec.Network`; :func:`balanced_shape`
        proposes sizes).

    Returns
    -------
    Network

    Examples
    --------
    >>> dense(3, 2, expert_dims=4).core_shapes
    ((4, 4, 2),)
    """
    return _build(
        "dense",
        in_features,
        out_features,
        expert_dims,
        None,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


def cp(
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    rank: int,
    bias: bool = True,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    r"""CP: one factor matrix per mode, all sharing the rank-:math:`R` bond ``r``.

    .. math::
        \mathcal{W}[n_1, \dots, n_E, i, o]
        = \sum_{r=1}^{R} U_1[n_1, r] \cdots U_E[n_E, r]\, U_I[i, r]\, U_O[o, r]

    Parameters
    ----------
    in_features, out_features : int
        :math:`I` and :math:`O`.
    expert_dims : int or sequence of int
        Experts per level, :math:`N_1, \dots, N_E`.
    rank : int
        :math:`R`.
    bias : bool, default True
        Whether the input mode has a bias slice (:math:`I' = I + 1`).
    in_shape, out_shape : sequence of int, optional
        Split the input (output) into legs of these sizes, each a mode of
        its own (see :class:`~mumoe.spec.Network`; :func:`balanced_shape`
        proposes sizes).

    Returns
    -------
    Network

    Examples
    --------
    >>> net = cp(16, 10, expert_dims=(8, 4), rank=5)
    >>> net.spec
    'n1 r, n2 r, i r, o r'
    >>> net.n_params == 5 * (8 + 4 + 17 + 10)
    True
    """
    return _build(
        "cp",
        in_features,
        out_features,
        expert_dims,
        rank,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


def tucker(
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    rank: Rank,
    bias: bool = True,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    r"""Tucker: a factor matrix per mode around a core tensor of shape ``rank``.

    .. math::
        \mathcal{W}[n_1, \dots, i, o] = \sum_{r_1, \dots, r_I, r_O}
        \mathcal{G}[r_1, \dots, r_E, r_I, r_O]\, U_1[n_1, r_1] \cdots U_I[i, r_I]\, U_O[o, r_O]

    Parameters
    ----------
    in_features, out_features : int
        :math:`I` and :math:`O`.
    expert_dims : int or sequence of int
        Experts per level, :math:`N_1, \dots, N_E`.
    rank : int or sequence of int
        One rank for all modes, or :math:`E + 2` ranks (experts..., input, output).
    bias : bool, default True
        Whether the input mode has a bias slice (:math:`I' = I + 1`).
    in_shape, out_shape : sequence of int, optional
        Split the input (output) into legs of these sizes, each a mode of
        its own (see :class:`~mumoe.spec.Network`; :func:`balanced_shape`
        proposes sizes).

    Returns
    -------
    Network

    Examples
    --------
    >>> net = tucker(16, 10, expert_dims=8, rank=(2, 3, 4))
    >>> net.spec
    'n1 r1, i ri, o ro, r1 ri ro'
    >>> net.core_shapes
    ((8, 2), (17, 3), (10, 4), (2, 3, 4))
    """
    return _build(
        "tucker",
        in_features,
        out_features,
        expert_dims,
        rank,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


def tt(
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    rank: Rank,
    bias: bool = True,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    r"""Tensor train: a chain of third-order cores, experts first, output last.

    .. math::
        \mathcal{W}[n_1, \dots, i, o] = \sum_{r_1, \dots, r_{d-1}}
        \mathcal{G}_1[n_1, r_1]\, \mathcal{G}_2[r_1, n_2, r_2] \cdots
        \mathcal{G}_d[r_{d-1}, o]

    The boundary cores have no size-1 bond; TensorLy's ``tt_to_tensor`` wants
    them with one (``(1, D_1, R_1)`` and ``(R_{d-1}, O, 1)``).

    Parameters
    ----------
    in_features, out_features : int
        :math:`I` and :math:`O`.
    expert_dims : int or sequence of int
        Experts per level, :math:`N_1, \dots, N_E`.
    rank : int or sequence of int
        See :func:`validate_tt_rank`.
    bias : bool, default True
        Whether the input mode has a bias slice (:math:`I' = I + 1`).
    in_shape, out_shape : sequence of int, optional
        Split the input (output) into legs of these sizes, each a mode of
        its own (see :class:`~mumoe.spec.Network`; :func:`balanced_shape`
        proposes sizes).

    Returns
    -------
    Network

    Examples
    --------
    >>> net = tt(16, 10, expert_dims=8, rank=(3, 4))
    >>> net.spec
    'n1 r1, r1 i r2, r2 o'
    >>> net.core_shapes
    ((8, 3), (3, 17, 4), (4, 10))
    """
    return _build(
        "tt",
        in_features,
        out_features,
        expert_dims,
        rank,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


def tr(
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    rank: Rank,
    bias: bool = True,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    r"""Tensor ring: third-order cores in a closed chain.

    .. math::
        \mathcal{W}[n_1, \dots, i, o] = \sum_{r_0, \dots, r_{d-1}}
        \mathcal{G}_1[r_0, n_1, r_1]\, \mathcal{G}_2[r_1, n_2, r_2] \cdots
        \mathcal{G}_d[r_{d-1}, o, r_0]

    The cores have TensorLy's ``tr_to_tensor`` layout ``(R_{k-1}, D_k, R_k)``.

    Parameters
    ----------
    in_features, out_features : int
        :math:`I` and :math:`O`.
    expert_dims : int or sequence of int
        Experts per level, :math:`N_1, \dots, N_E`.
    rank : int or sequence of int
        See :func:`validate_tr_rank`.
    bias : bool, default True
        Whether the input mode has a bias slice (:math:`I' = I + 1`).
    in_shape, out_shape : sequence of int, optional
        Split the input (output) into legs of these sizes, each a mode of
        its own (see :class:`~mumoe.spec.Network`; :func:`balanced_shape`
        proposes sizes).

    Returns
    -------
    Network

    Examples
    --------
    >>> net = tr(16, 10, expert_dims=8, rank=(2, 3, 4))
    >>> net.spec
    'r0 n1 r1, r1 i r2, r2 o r0'
    >>> net.core_shapes
    ((2, 8, 3), (3, 17, 4), (4, 10, 2))
    """
    return _build(
        "tr",
        in_features,
        out_features,
        expert_dims,
        rank,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


def ttm(
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    rank: Rank,
    bias: bool = True,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    r"""TT-matrix experts: a chain of expert cores, then one core per pair of legs.

    .. math::
        \mathcal{W}[n_1, \dots, n_E, (i_1 \dots i_K), (o_1 \dots o_K)]
        = \sum_{r} \mathcal{G}_1[n_1, r_1] \cdots \mathcal{G}_E[r_{E-1}, n_E, r_E]\,
        \mathcal{M}_1[r_E, i_1, o_1, r_{E+1}] \cdots \mathcal{M}_K[r_{E+K-1}, i_K, o_K]

    The input and output are split into :math:`K` legs each (row-major), and
    core :math:`\mathcal{M}_k` maps input leg :math:`i_k` to output leg
    :math:`o_k`: tensorly-torch's BlockTT factorisation of the weight, with
    the experts' cores in front.  The experts sit on cores of their own, so
    :math:`N` costs :math:`N R_1` parameters and a ``(B, N) @ (N, R_1)``
    product, whatever the size of the matrix.

    Parameters
    ----------
    in_features, out_features : int
        :math:`I` and :math:`O`.
    expert_dims : int or sequence of int
        Experts per level, :math:`N_1, \dots, N_E`.
    rank : int or sequence of int
        The chain's bonds ``r1, ..., r{E+K-1}`` (see :func:`validate_tt_rank`
        with :math:`d = E + K`).
    bias : bool, default True
        Whether the input mode has a bias slice (on ``i1``: see
        :class:`~mumoe.spec.Network`).
    in_shape, out_shape : sequence of int, optional
        The sizes of the input and output legs, of one length :math:`K`.  A
        missing one is :func:`balanced_shape` of the size with the other's
        length; both missing, :math:`K = 2`.

    Returns
    -------
    Network

    Raises
    ------
    ValueError
        If ``in_shape`` and ``out_shape`` differ in length.

    Examples
    --------
    >>> net = ttm(768, 768, expert_dims=64, rank=8, in_shape=(32, 24), out_shape=(32, 24))
    >>> net.spec
    'n1 r1, r1 i1 o1 r2, r2 i2 o2'
    >>> net.core_shapes
    ((64, 8), (8, 33, 32, 8), (8, 24, 24))
    >>> ttm(768, 3072, expert_dims=8, rank=4).out_shape  # balanced, K = 2
    (64, 48)
    """
    in_shape, out_shape = ttm_shapes(in_features, out_features, in_shape, out_shape)
    return _build(
        "ttm",
        in_features,
        out_features,
        expert_dims,
        rank,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


def ttm_shapes(
    in_features: int,
    out_features: int,
    in_shape: Sequence[int] | None,
    out_shape: Sequence[int] | None,
) -> tuple[Sequence[int], Sequence[int]]:
    """The legs of a TT-matrix: those given, a missing one balanced to the other's length.

    Parameters
    ----------
    in_features, out_features : int
    in_shape, out_shape : sequence of int or None

    Returns
    -------
    in_shape, out_shape : sequence of int
        Both missing: :func:`balanced_shape` of each in 2 legs (a prime
        size as ``(size, 1)``).

    Examples
    --------
    >>> ttm_shapes(768, 3072, None, None), ttm_shapes(768, 3072, (4, 12, 16), None)
    (((32, 24), (64, 48)), ((4, 12, 16), (16, 16, 12)))
    """
    if in_shape is not None and out_shape is not None:
        return in_shape, out_shape
    given = in_shape if in_shape is not None else out_shape
    order = 2 if given is None else len(positive_ints(given, "in_shape or out_shape"))
    return (
        balanced_shape(in_features, order, strict=False) if in_shape is None else in_shape,
        balanced_shape(out_features, order, strict=False) if out_shape is None else out_shape,
    )


def mxd(
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    bias: bool = True,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    r"""MxD's Hadamard experts: the output leg shared, open, by every core.

    .. math::
        \mathcal{W}[n_1, \dots, n_E, i, o]
        = C_1[n_1, o] \cdots C_E[n_E, o]\, D[i, o]

    so that :math:`y = (C_1^\top a^{(1)}) * \cdots * (C_E^\top a^{(E)}) * (D^\top z)`
    (Mixture of Decoders, Oldfield et al., 2025).  Every expert's matrix
    :math:`D \operatorname{diag}(c_n)` is full rank where :math:`D` is.

    Parameters
    ----------
    in_features, out_features : int
        :math:`I` and :math:`O`.
    expert_dims : int or sequence of int
        Experts per level, :math:`N_1, \dots, N_E`.
    bias : bool, default True
        Whether the input mode has a bias slice (:math:`I' = I + 1`).
    in_shape, out_shape : sequence of int, optional
        Split the input (output) into legs of these sizes, each a mode of
        its own (see :class:`~mumoe.spec.Network`; :func:`balanced_shape`
        proposes sizes).

    Returns
    -------
    Network

    Examples
    --------
    >>> net = mxd(12, 8, expert_dims=16)
    >>> net.spec, net.core_shapes, net.n_params  # O * (N + I')
    ('n1 o, i o', ((16, 8), (13, 8)), 232)
    """
    return _build(
        "mxd",
        in_features,
        out_features,
        expert_dims,
        None,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


def lowrank(
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    rank: int,
    bias: bool = True,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    r"""Per-expert low-rank matrices: the expert legs shared, open, by both cores.

    .. math::
        \mathcal{W}[n_1, \dots, n_E, i, o]
        = \sum_{r=1}^{R} U[n_1, \dots, n_E, i, r]\, V[n_1, \dots, n_E, o, r]

    Every (joint) expert has its own rank-:math:`R` matrix :math:`U_n V_n^\top`.

    Parameters
    ----------
    in_features, out_features : int
        :math:`I` and :math:`O`.
    expert_dims : int or sequence of int
        Experts per level, :math:`N_1, \dots, N_E`.
    rank : int
        :math:`R`.
    bias : bool, default True
        Whether the input mode has a bias slice (:math:`I' = I + 1`).
    in_shape, out_shape : sequence of int, optional
        Split the input (output) into legs of these sizes, each a mode of
        its own (see :class:`~mumoe.spec.Network`; :func:`balanced_shape`
        proposes sizes).

    Returns
    -------
    Network

    Examples
    --------
    >>> net = lowrank(16, 10, expert_dims=8, rank=2)
    >>> net.spec, net.core_shapes
    ('n1 i r, n1 o r', ((8, 17, 2), (8, 10, 2)))
    """
    return _build(
        "lowrank",
        in_features,
        out_features,
        expert_dims,
        rank,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


#: The presets by format name, one per record of :data:`mumoe.spec.FORMATS`.
PRESETS: dict[str, Callable[..., Network]] = {
    "dense": dense,
    "cp": cp,
    "tucker": tucker,
    "tt": tt,
    "tr": tr,
    "ttm": ttm,
    "mxd": mxd,
    "lowrank": lowrank,
}


def preset(
    format: str,
    in_features: int,
    out_features: int,
    *,
    expert_dims: int | Sequence[int],
    **options: Any,
) -> Network:
    """Build the preset network named ``format``.

    Parameters
    ----------
    format : {"dense", "cp", "tucker", "tt", "tr", "ttm", "mxd", "lowrank"}
        The factorisation, a key of :data:`mumoe.spec.FORMATS`.
    in_features, out_features, expert_dims
        As for every preset.
    **options
        The preset's keyword arguments (``rank``, ``bias``, ...).

    Returns
    -------
    Network

    Examples
    --------
    >>> preset("tr", 16, 10, expert_dims=8, rank=2).format
    'tr'
    """
    try:
        build = PRESETS[format]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(format).lower(), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown format {format!r}{hint}; choose one of {', '.join(map(repr, PRESETS))}"
        ) from None
    return build(in_features, out_features, expert_dims=expert_dims, **options)


def preset_format(network: Network) -> str | None:
    """The preset whose structure ``network`` has, or ``None`` for a custom network.

    The structure is the spec (cores and their legs); sizes may be anything.
    The same as :attr:`Network.format <mumoe.spec.Network.format>`, with
    ``None`` for ``"custom"``.

    Parameters
    ----------
    network : Network

    Returns
    -------
    str or None

    Examples
    --------
    >>> preset_format(tr(16, 10, expert_dims=8, rank=2))
    'tr'
    >>> preset_format(Network("n r, i r, o r", 16, 10, expert_dims=8, rank=2))
    'cp'
    >>> preset_format(Network("n i r, r o", 16, 10, expert_dims=8, rank=2)) is None
    True
    """
    name = network.format
    return None if name == "custom" else name
