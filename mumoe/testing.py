r"""Oracles, tolerances and hypothesis strategies for testing μMoE networks.

Public so that users who declare their own networks, or write their own
layers, can hold them to the same checks as mumoe's test suite:

* :func:`dense_forward` is the one oracle: Eq. (1) of the paper contracted
  densely in float64 NumPy over a materialised weight tensor;
* :data:`TOLERANCES` and :func:`assert_close` compare results per dtype;
* :func:`networks`, :func:`custom_networks` and :func:`preset_networks` are
  hypothesis strategies that draw network *structure* (levels, cores, bonds,
  sizes 1-5, ranks 1-4), and :func:`networks_of` the sizes of one spec of
  your own; values come from a seeded generator (:func:`random_inputs`),
  bounded in [-1, 1].

Importing this module needs ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorly as tl
from hypothesis import strategies as st

from mumoe.spec import FORMATS, Network, parse_spec
from mumoe.typing import Shape, Tensor
from mumoe.validation import check_bool, positive_int

__all__ = [
    "HALF_PRECISION_TOLERANCES",
    "TOLERANCES",
    "assert_close",
    "backend_dtype",
    "batch_shapes",
    "custom_networks",
    "custom_specs",
    "dense_forward",
    "n_terms",
    "networks",
    "networks_of",
    "preset_networks",
    "random_inputs",
    "seeds",
    "to_numpy64",
]

#: ``(rtol, atol)`` per dtype for results of one contraction of values in
#: [-1, 1]; :func:`assert_close` widens ``atol`` with the size of the sums.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-5, 1e-6),
    "bfloat16": (1e-2, 1e-2),
    "float16": (1e-2, 1e-3),
}

#: The documented accuracy of a half-precision layer against the same layer in
#: float32, as normwise relative errors ``|a - b| / |b|``: ``(output, gradient
#: of the cores)``.  Measured worst cases over the five presets (64 rows,
#: trained-like gates): float16 1.0e-3 / 1.4e-3, bfloat16 9.7e-3 / 1.2e-2.
HALF_PRECISION_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (5e-3, 1e-2),
    "bfloat16": (4e-2, 5e-2),
}


def to_numpy64(tensor: Tensor) -> np.ndarray:
    """Copy a tensor of any backend into a float64 NumPy array (detached).

    Parameters
    ----------
    tensor : tensor of any backend, or array-like

    Returns
    -------
    numpy.ndarray of float64

    Examples
    --------
    >>> import numpy as np
    >>> to_numpy64(np.ones(2, dtype=np.float32)).dtype
    dtype('float64')
    """
    if hasattr(tensor, "detach"):
        tensor = tensor.detach()
    array = tl.to_numpy(tensor) if tl.is_tensor(tensor) else np.asarray(tensor)
    return np.asarray(array, dtype=np.float64)


def assert_close(actual: Tensor, desired: Any, dtype: str = "float64", scale: float = 1.0) -> None:
    """Assert that ``actual`` equals ``desired`` within the tolerance of ``dtype``.

    Parameters
    ----------
    actual, desired : tensors or arrays
        Compared in float64 after conversion with :func:`to_numpy64`; shapes
        must agree exactly.
    dtype : str
        A key of :data:`TOLERANCES`.
    scale : float
        Multiplies ``atol``: the number of terms summed per output entry is a
        good choice, since rounding errors grow with it.

    Examples
    --------
    >>> import numpy as np
    >>> assert_close(np.float32([1.0, 2.0]), [1.0, 2.0 + 1e-7], "float32")
    >>> assert_close(np.ones(2), np.ones(3))
    Traceback (most recent call last):
        ...
    AssertionError: shapes differ: (2,) != (3,)
    """
    rtol, atol = TOLERANCES[dtype]
    a, d = to_numpy64(actual), to_numpy64(desired)
    if a.shape != d.shape:
        raise AssertionError(f"shapes differ: {a.shape} != {d.shape}")
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol * max(scale, 1.0))


def dense_forward(weight: Any, x: Any, gates: Sequence[Any], bias: bool) -> np.ndarray:
    r"""Eq. (1) of the paper, densely, in float64 NumPy: the oracle.

    .. math::
        y_{bo} = \sum_{n_1 \dots n_E, i} W[n_1, \dots, n_E, i, o]\,
        a^{(1)}_{b n_1} \cdots a^{(E)}_{b n_E}\, z_{bi}

    Parameters
    ----------
    weight : array, shape (N_1, ..., N_E, I', O)
        The materialised weight tensor.
    x : array, shape (..., I)
    gates : sequence of arrays, each (..., N_e)
    bias : bool
        Whether ``z = [x, 1]`` (then ``I' = I + 1``) or ``z = x``.

    Returns
    -------
    numpy.ndarray, shape (..., O)

    Examples
    --------
    >>> import numpy as np
    >>> weight = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)  # 2 experts, I' = 3, O = 2
    >>> dense_forward(weight, np.array([[1.0, 1.0]]), [np.array([[0.5, 0.5]])], bias=True)
    array([[15., 18.]])
    """
    w = to_numpy64(weight)
    z = to_numpy64(x)
    if bias:
        z = np.concatenate([z, np.ones((*z.shape[:-1], 1))], axis=-1)
    levels = string.ascii_lowercase[: len(gates)]
    operands = [w, *(to_numpy64(g) for g in gates), z]
    subscripts = f"{levels}IO," + ",".join(f"...{n}" for n in levels) + ",...I->...O"
    return np.einsum(subscripts, *operands)


def backend_dtype(name: str) -> Any:
    """The active backend's dtype called ``name`` (``"float32"``, ``"float64"``, ...).

    Use this rather than ``tl.float64``: TensorLy 0.8-0.10 export NumPy's
    ``float64`` at top level whatever the backend, while ``tl.backend.float64``
    follows the active one.

    Parameters
    ----------
    name : str
        ``"float32"``, ``"float64"``, ...

    Returns
    -------
    dtype
        The active backend's own dtype object.

    Examples
    --------
    >>> import tensorly as tl
    >>> tl.tensor([1.0, 2.0], dtype=backend_dtype("float32")).dtype  # NumPy active
    dtype('float32')
    """
    return getattr(tl.backend, name)


def random_inputs(
    network: Network,
    batch_shape: Shape,
    *,
    random_state: int | np.random.RandomState | None = None,
    **context: Any,
) -> tuple[Tensor, list[Tensor]]:
    """An input and gates for ``network``, uniform in [-1, 1], on the active backend.

    Parameters
    ----------
    network : Network
    batch_shape : tuple of int
        The leading dimensions.
    random_state : None, int or numpy.random.RandomState
    **context
        Passed to ``tl.tensor`` (``dtype``, ``device``, ...).

    Returns
    -------
    x : tensor, shape batch_shape + (I,)
    gates : list of tensors, each of shape batch_shape + (N_e,)

    Examples
    --------
    >>> from mumoe import tr
    >>> x, gates = random_inputs(tr(5, 2, expert_dims=(4, 3), rank=2), (6, 7), random_state=0)
    >>> x.shape, [g.shape for g in gates]
    ((6, 7, 5), [(6, 7, 4), (6, 7, 3)])
    """
    rng = tl.check_random_state(random_state)
    x = tl.tensor(rng.uniform(-1, 1, (*batch_shape, network.in_features)), **context)
    gates = [
        tl.tensor(rng.uniform(-1, 1, (*batch_shape, n)), **context) for n in network.expert_dims
    ]
    return x, gates


# --------------------------------------------------------------- strategies

_sizes = st.integers(1, 5)
_ranks = st.integers(1, 4)
#: The sizes of the legs of a split input or output (their product is the mode's).
_leg_sizes = st.integers(1, 3)


def _mode(draw: st.DrawFn, n_legs: int) -> tuple[int, tuple[int, ...] | None]:
    # A mode's size and, where it is split, its legs' sizes.
    if n_legs == 1:
        return draw(_sizes), None
    shape = tuple(draw(st.lists(_leg_sizes, min_size=n_legs, max_size=n_legs)))
    return math.prod(shape), shape


def seeds() -> st.SearchStrategy[int]:
    """Seeds for the generators that draw values: NumPy's and torch's alike.

    Below :math:`2^{31} - 1`, so that ``seed + 1`` is a seed too.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of int

    Examples
    --------
    >>> from hypothesis import given
    >>> @given(seeds())
    ... def test(seed):
    ...     assert 0 <= seed + 1 < 2**31
    >>> test()
    """
    return st.integers(0, 2**31 - 2)


def batch_shapes(max_dims: int = 2, max_side: int = 3) -> st.SearchStrategy[Shape]:
    """Leading batch shapes: zero to ``max_dims`` dimensions of size 1 to ``max_side``.

    Parameters
    ----------
    max_dims : int, default 2
    max_side : int, default 3

    Returns
    -------
    hypothesis.strategies.SearchStrategy of tuple of int

    Examples
    --------
    >>> from hypothesis import given
    >>> @given(batch_shapes(max_dims=2, max_side=3))
    ... def test(shape):
    ...     assert len(shape) <= 2 and all(1 <= side <= 3 for side in shape)
    >>> test()
    """
    return st.lists(st.integers(1, max_side), max_size=max_dims).map(tuple)


@st.composite
def preset_networks(
    draw: st.DrawFn,
    formats: Sequence[str] = tuple(FORMATS),
    max_levels: int = 3,
) -> Network:
    """Networks of the presets, for E in 1..``max_levels``, random sizes and ranks.

    The input and output are split into 2 legs (sizes 1-3) a quarter of the
    time each (together, for ``ttm``).

    Examples
    --------
    >>> from hypothesis import given
    >>> @given(preset_networks(max_levels=2))
    ... def test(net):
    ...     assert net.format in FORMATS and net.n_levels <= 2
    >>> test()
    """
    fmt = draw(st.sampled_from(list(formats)))
    n_levels = draw(st.integers(1, max_levels))
    dims = draw(st.lists(_sizes, min_size=n_levels, max_size=n_levels))
    split = st.sampled_from([1, 1, 1, 2])
    n_in = draw(split)
    n_out = n_in if fmt == "ttm" else draw(split)
    in_features, in_shape = _mode(draw, n_in)
    out_features, out_shape = _mode(draw, n_out)
    bias = draw(st.booleans())
    # Every bond of the format's spec gets its own size: the formats' full rank tuples.
    spec = FORMATS[fmt].spec(n_levels, n_in, n_out)
    rank = {bond: draw(_ranks) for bond in parse_spec(spec).bonds}
    return Network(
        spec,
        in_features,
        out_features,
        expert_dims=dims,
        rank=rank or None,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )


@st.composite
def custom_specs(draw: st.DrawFn, max_levels: int = 3, max_cores: int = 4) -> str:
    """Random valid specs: role legs spread over cores, joined by a random bond graph.

    The input and output are split into 2 or 3 legs (``i1 i2``) a third of
    the time each.  Each role leg sits in one core or is shared by two (an
    open hyperedge, as in MxD's ``"n o, i o"``).  The cores are connected by a random
    spanning tree of bonds, plus up to two extra bonds that may join any
    number of cores (hyperedges, as in CP).  Legs are shuffled within each
    core.

    Examples
    --------
    >>> from hypothesis import given
    >>> from mumoe import parse_spec
    >>> @given(custom_specs(max_levels=2, max_cores=3))
    ... def test(spec):
    ...     assert len(parse_spec(spec).core_legs) <= 3
    >>> test()
    """
    n_levels = draw(st.integers(1, max_levels))
    n_cores = draw(st.integers(1, max_cores))
    if n_levels == 1 and draw(st.booleans()):
        experts = ["n"]
    else:
        experts = [f"n{e}" for e in range(1, n_levels + 1)]
    legs: list[list[str]] = [[] for _ in range(n_cores)]
    inputs, outputs = (_split_legs(draw, role) for role in ("i", "o"))
    for role in [*experts, *inputs, *outputs]:
        # Most role legs in one core; some shared by several (open hyperedges).
        holders = st.lists(st.integers(0, n_cores - 1), min_size=1, max_size=2, unique=True)
        for k in draw(holders):
            legs[k].append(role)
    groups = [[draw(st.integers(0, k - 1)), k] for k in range(1, n_cores)]
    if n_cores > 1:
        extra = st.lists(st.integers(0, n_cores - 1), min_size=2, max_size=n_cores, unique=True)
        groups += draw(st.lists(extra, max_size=2))
    for b, group in enumerate(groups):
        for k in group:
            legs[k].append(f"b{b}")
    cores = [draw(st.permutations(core)) for core in legs]
    return ", ".join(" ".join(core) for core in cores)


def _split_legs(draw: st.DrawFn, role: str) -> list[str]:
    # 'i', or 'i1', ..., 'iK' for K of 2 or 3.
    count = draw(st.sampled_from([1, 1, 1, 1, 2, 2, 3]))
    return [role] if count == 1 else [f"{role}{k}" for k in range(1, count + 1)]


@st.composite
def custom_networks(draw: st.DrawFn, max_levels: int = 3, max_cores: int = 4) -> Network:
    """Networks of :func:`custom_specs` with random sizes 1-5 and bond sizes 1-4.

    Examples
    --------
    >>> from hypothesis import given
    >>> @given(custom_networks())
    ... def test(net):
    ...     assert all(1 <= r <= 4 for r in net.ranks.values())
    >>> test()
    """
    spec = draw(custom_specs(max_levels, max_cores))
    parsed = parse_spec(spec)
    dims = draw(
        st.lists(_sizes, min_size=len(parsed.expert_legs), max_size=len(parsed.expert_legs))
    )
    rank = {bond: draw(_ranks) for bond in parsed.bonds}
    in_features, in_shape = _mode(draw, len(parsed.input_legs))
    out_features, out_shape = _mode(draw, len(parsed.output_legs))
    return Network(
        spec,
        in_features,
        out_features,
        expert_dims=dims,
        rank=rank,
        bias=draw(st.booleans()),
        in_shape=in_shape,
        out_shape=out_shape,
    )


def networks_of(
    spec: str, *, max_size: int = 5, max_rank: int = 4, bias: bool | None = None
) -> st.SearchStrategy[Network]:
    """Networks of one spec, your own: random sizes and bond sizes, the structure fixed.

    Parameters
    ----------
    spec : str
        The network's spec (checked now: an invalid one raises here, not in
        the test).
    max_size : int, default 5
        Expert counts, ``in_features`` and ``out_features`` are drawn in
        ``1..max_size`` (the legs of a split mode in ``1..3``).
    max_rank : int, default 4
        Every bond's size is drawn in ``1..max_rank``, each on its own.
    bias : bool, optional
        Both by default.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Network

    Examples
    --------
    Hold a network of your own to the oracle, Eq. (1) over the materialised
    weight tensor:

    >>> from hypothesis import given, settings
    >>> from mumoe import forward, materialize, random_cores
    >>> @settings(max_examples=20)
    ... @given(networks_of("n1 a, a n2 b, i b c, o c"), batch_shapes(), seeds())
    ... def test(net, batch_shape, seed):
    ...     cores = random_cores(net, random_state=seed)
    ...     x, gates = random_inputs(net, batch_shape, random_state=seed)
    ...     expected = dense_forward(materialize(net, cores), x, gates, net.bias)
    ...     assert_close(forward(net, cores, x, gates), expected, scale=n_terms(net))
    >>> test()
    """
    parsed = parse_spec(spec)
    sizes = st.integers(1, positive_int(max_size, "max_size"))
    ranks = st.integers(1, positive_int(max_rank, "max_rank"))
    levels = len(parsed.expert_legs)

    def build(
        dims: list[int],
        i: list[int],
        o: list[int],
        rank: dict[str, int],
        with_bias: bool,
    ) -> Network:
        return Network(
            spec,
            math.prod(i),
            math.prod(o),
            expert_dims=dims,
            rank=rank or None,
            bias=with_bias,
            in_shape=i if len(i) > 1 else None,
            out_shape=o if len(o) > 1 else None,
        )

    def legs(count: int) -> st.SearchStrategy[list[int]]:
        # One size for an unsplit mode; the legs' sizes, each up to 3, for a split one.
        return st.lists(sizes if count == 1 else _leg_sizes, min_size=count, max_size=count)

    return st.builds(
        build,
        st.lists(sizes, min_size=levels, max_size=levels),
        legs(len(parsed.input_legs)),
        legs(len(parsed.output_legs)),
        st.fixed_dictionaries({bond: ranks for bond in parsed.bonds}),
        st.booleans() if bias is None else st.just(check_bool(bias, "bias")),
    )


def networks(max_levels: int = 3) -> st.SearchStrategy[Network]:
    """Preset and custom networks alike.

    Parameters
    ----------
    max_levels : int, default 3
        The most expert levels.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Network

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from mumoe import forward, materialize, random_cores
    >>> @settings(max_examples=20)
    ... @given(networks(), batch_shapes())
    ... def test(net, batch_shape):
    ...     cores = random_cores(net, random_state=0)
    ...     x, gates = random_inputs(net, batch_shape, random_state=0)
    ...     expected = dense_forward(materialize(net, cores), x, gates, net.bias)
    ...     assert_close(forward(net, cores, x, gates), expected, scale=n_terms(net))
    >>> test()
    """
    return st.one_of(preset_networks(max_levels=max_levels), custom_networks(max_levels))


def n_terms(network: Network) -> int:
    r"""Terms summed per output entry of Eq. (1): a scale for :func:`assert_close`.

    Parameters
    ----------
    network : Network

    Returns
    -------
    int
        :math:`\prod_e N_e \cdot I' \cdot \prod_b R_b` (:math:`I'` the
        product of the input legs' sizes where the input is split).

    Examples
    --------
    >>> from mumoe import cp
    >>> n_terms(cp(5, 3, expert_dims=8, rank=2))  # N * I' * R
    96
    """
    inputs = math.prod(network.input_sizes)
    return math.prod(network.expert_dims) * inputs * math.prod(network.ranks.values())
