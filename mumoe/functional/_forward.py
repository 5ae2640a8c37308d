r"""The μMoE forward pass and dense views, on whatever backend TensorLy has active.

Index legend used in the docstrings: ``b`` batch (any number of leading
dimensions, flattened), ``n_e`` expert mode ``e``, ``i`` input, ``o`` output.

Every function takes the arrays of the active TensorLy backend
(``tl.set_backend('numpy' | 'pytorch' | 'cupy' | ...)``), checks them, and
contracts them with a cached plan of the network; nothing here converts
arrays between backends or calls ``tl.set_backend``.  On PyTorch, autograd
flows through every function.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorly as tl

from mumoe.backends import array_device, creation_context
from mumoe.functional._checks import check_cores, check_level
from mumoe.functional._legs import matrix_form, run_plan
from mumoe.functional._sparse import contract_sparse, densify
from mumoe.plan import Plan, Planner, planner_of, resolve_planner
from mumoe.spec import Network
from mumoe.typing import SparseGate, Tensor
from mumoe.validation import check_scales, check_tensor, is_tensor

__all__ = [
    "ExpertWeight",
    "check_support_indices",
    "contract",
    "expert_weight",
    "forward",
    "materialize",
    "random_cores",
    "scale_experts",
]


def forward(
    network: Network,
    cores: Sequence[Tensor],
    x: Tensor,
    gates: Tensor | Sequence[Tensor],
    *,
    planner: Planner | None = None,
    differentiable: bool | None = None,
) -> Tensor:
    r"""The μMoE layer's output, contracted from its factors (Eq. 1 of the paper).

    .. math::
        y_{bo} = \sum_{n_1, \dots, n_E, i}
        \mathcal{W}[n_1, \dots, n_E, i, o]\,
        a^{(1)}_{b n_1} \cdots a^{(E)}_{b n_E}\, z_{bi}

    where :math:`z_b = [x_b, 1]` with a bias and :math:`z_b = x_b` without,
    and :math:`\mathcal{W}` is never formed: the gates, the input and the
    cores are contracted along a cached plan of the network's planner.

    The bias is added inside the contraction (``x @ core[:I] + core[I]``, no
    column of ones) when no core requires a gradient, or when the batch has
    more than twice as many rows as the bias slice has entries; otherwise
    ``z = [x, 1]`` is formed, which costs less in a backward pass (the bias
    rule, :meth:`mumoe.plan.Plan.bias_inside`).

    A level given as a support whose density ``k / N_e`` is at most the
    planner's crossover (:meth:`mumoe.plan.Planner.max_density`) is contracted
    sparsely: the core holding its expert leg is gathered at the ``k``
    indices of each row (:func:`mumoe.functional.gather_sum`) instead of
    multiplied by ``N_e - k`` zeros; a wider support is made dense first, as
    is one whose dense step is too small to repay a gather
    (:meth:`mumoe.plan.Planner.worth_gathering`; :func:`mumoe.plan.describe`
    tells which).  Both give the same result.  Sparse plans follow the
    planner's optimiser (autotuning times the dense plans only).

    Parameters
    ----------
    network : Network
        The factorisation of :math:`\mathcal{W}`.
    cores : sequence of tensors
        One tensor per core of ``network``, of shapes ``network.core_shapes``.
    x : tensor, shape (..., I)
        The input; any number of leading batch dimensions (none included).
    gates : sequence of tensors (..., N_e) or SparseGate
        The expert coefficients of each level, with exactly the leading
        dimensions of ``x``: dense, or given by each row's support, a
        :class:`~mumoe.typing.SparseGate` with indices and values of shape
        ``(..., k)``.  With one expert level a single one may be passed.
    planner : Planner, optional
        The planner of ``network`` whose plans (and path policy: optimiser,
        autotuning, sparse crossover) the call uses;
        :func:`mumoe.plan.planner_of` ``(network)`` by default.
    differentiable : bool, optional
        Whether gradients will flow to the cores (it chooses how the bias is
        added, see above); by default, whether a core has ``requires_grad``.
        The PyTorch modules pass ``torch.is_grad_enabled()`` as well.

    Returns
    -------
    tensor, shape (..., O)
        On the backend, device and dtype of ``x``.

    Raises
    ------
    TypeError
        If an operand is not a tensor of the active backend, ``x`` is not
        floating point, or the dtypes differ.
    ValueError
        If a shape does not match the network or the leading dimensions of
        ``x`` (nothing is broadcast), or a support's indices are out of range.

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import SparseGate, cp, random_cores
    >>> net = cp(3, 2, expert_dims=4, rank=5)
    >>> cores = random_cores(net, random_state=0)
    >>> x = np.ones((7, 3))
    >>> gates = np.full((7, 4), 0.25)
    >>> forward(net, cores, x, gates).shape
    (7, 2)
    >>> two = SparseGate(np.tile([0, 3], (7, 1)), np.full((7, 2), 0.5), 4)  # experts 0 and 3
    >>> dense = np.tile([0.5, 0.0, 0.0, 0.5], (7, 1))
    >>> bool(np.allclose(forward(net, cores, x, two), forward(net, cores, x, dense)))
    True
    """
    planner = resolve_planner(network, planner)
    backend = tl.get_backend()
    rows, flat_gates, batch_shape = _operands(network, x, gates, backend)
    check_support_indices(flat_gates)
    check_cores(network, cores, backend, x.dtype)
    return _contract(planner, cores, x, rows, flat_gates, batch_shape, differentiable, backend)


def contract(
    network: Network,
    cores: Sequence[Tensor],
    x: Tensor,
    gates: Tensor | Sequence[Tensor],
    *,
    planner: Planner | None = None,
    differentiable: bool | None = None,
    backend: str | None = None,
    check_x: bool = True,
) -> Tensor:
    """:func:`forward` for callers that checked the cores already: no per-call walk over them.

    The layers check their cores once, at construction (and their input's
    dtype and device against them on each call); ``x`` and the gates are
    checked here as in :func:`forward`.

    Parameters
    ----------
    network, cores, x, gates, differentiable
        As for :func:`forward`; the cores must fit ``network`` and share the
        dtype and backend of ``x``.
    planner : Planner, optional
        A planner of ``network`` (not checked: the layers pass their own);
        :func:`mumoe.plan.planner_of` ``(network)`` by default.
    backend : str, optional
        The active TensorLy backend, if the caller knows it.
    check_x : bool, default True
        False where the caller has checked that ``x`` is a floating tensor of
        the backend with the cores' dtype (its shape is checked anyway), and
        the indices of any support (:func:`check_support_indices`), as the
        layers do for the supports their gates make.

    Returns
    -------
    tensor, shape (..., O)

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, random_cores
    >>> net = cp(3, 2, expert_dims=4, rank=5)
    >>> contract(net, random_cores(net, random_state=0), np.ones((7, 3)), np.ones((7, 4))).shape
    (7, 2)
    """
    if planner is None:
        planner = planner_of(network)
    if backend is None:
        backend = tl.get_backend()
    rows, flat_gates, batch_shape = _operands(network, x, gates, backend, check_x)
    if check_x:
        check_support_indices(flat_gates)
    return _contract(planner, cores, x, rows, flat_gates, batch_shape, differentiable, backend)


def _operands(
    network: Network, x: Tensor, gates: Any, backend: str, check_x: bool = True
) -> tuple[Tensor, list[Tensor], tuple[int, ...]]:
    # x and the gates checked, their leading dimensions flattened into rows.
    shape = check_tensor(x, "x", backend) if check_x else x.shape
    if not shape or shape[-1] != network.in_features:
        raise ValueError(
            f"x must have shape (..., {network.in_features}) (in_features), got {tuple(shape)}"
        )
    batch_shape = tuple(shape[:-1]) if check_x or len(shape) != 2 else (shape[0],)
    gates = _check_gates(network, gates, batch_shape, backend, x.dtype)
    if len(batch_shape) == 1:
        return x, gates, batch_shape
    # Plans contract one batch dimension: flatten the leading ones (a view
    # where the layout allows), and skip the reshapes when there is exactly one.
    batch_size = math.prod(batch_shape)
    rows = tl.reshape(x, (batch_size, network.in_features))
    gates = [_flat_gate(g, batch_size, n) for g, n in zip(gates, network.expert_dims, strict=True)]
    return rows, gates, batch_shape


def _flat_gate(gate: Any, batch_size: int, n: int) -> Any:
    if isinstance(gate, SparseGate):
        shape = (batch_size, gate.k)
        return SparseGate(tl.reshape(gate.indices, shape), tl.reshape(gate.values, shape), n)
    return tl.reshape(gate, (batch_size, n))


def check_support_indices(gates: Sequence[Any]) -> None:
    """Check that every support's indices lie in ``[0, N_e)`` (dense gates pass as they are).

    An index out of range would wrap around (NumPy), or fail deep in a kernel
    (a device assert on CUDA); it is refused here instead.  Two reductions and
    a host sync a support: :func:`forward` and :func:`contract` run it, the
    layers only for supports given to a call (their gates' are in range).

    Parameters
    ----------
    gates : sequence of tensors or SparseGate

    Raises
    ------
    ValueError
        Naming the level, the range and the indices found.

    Examples
    --------
    >>> import numpy as np
    >>> check_support_indices([SparseGate(np.array([[0, 9]]), np.ones((1, 2)), 8)])
    Traceback (most recent call last):
        ...
    ValueError: gates[0]: support indices must be in [0, 8), got values from 0 to 9
    """
    for e, gate in enumerate(gates):
        if isinstance(gate, SparseGate) and gate.indices.shape[0] and gate.k:
            low, high = int(tl.min(gate.indices)), int(tl.max(gate.indices))
            if low < 0 or high >= gate.n_experts:
                raise ValueError(
                    f"gates[{e}]: support indices must be in [0, {gate.n_experts}), got values "
                    f"from {low} to {high}"
                )


def _contract(
    planner: Planner,
    cores: Sequence[Tensor],
    x: Tensor,
    rows: Tensor,
    gates: list[Tensor],
    batch_shape: tuple[int, ...],
    differentiable: bool | None,
    backend: str,
) -> Tensor:
    network = planner.network
    batch_size = rows.shape[0]
    if differentiable is None:
        differentiable = any(getattr(core, "requires_grad", False) for core in cores)
    if any(isinstance(gate, SparseGate) for gate in gates):
        gates, levels = _route(planner, gates, backend, differentiable, batch_size)
        if levels:
            out = contract_sparse(planner, cores, rows, gates, levels, differentiable, backend)
            if len(batch_shape) == 1:
                return out
            return tl.reshape(out, (*batch_shape, network.out_features))
    if planner.autotune:
        timer = lambda plan: _time(plan, network, gates, rows, cores, differentiable)  # noqa: E731
        plan = planner.forward(batch_size, backend, x.dtype, timer, array_device(x))
        out = run_plan(plan, network, gates, rows, cores, differentiable)
    else:
        plan = planner.forward(batch_size, backend, x.dtype)
        if plan.bias_inside(batch_size, differentiable):  # Plan.run's common case, inlined
            out = plan.bias_program((*gates, rows, *cores))  # type: ignore[misc]
        else:
            out = run_plan(plan, network, gates, rows, cores, differentiable)
    if len(batch_shape) == 1 and len(out.shape) == 2:  # (B, O): no split output legs
        return out
    return tl.reshape(out, (*batch_shape, network.out_features))


def _route(
    planner: Planner, gates: list[Any], backend: str, differentiable: bool, batch_size: int
) -> tuple[list[Any], tuple[int, ...]]:
    # The levels contracted sparsely (support density within the crossover, a dense step
    # worth a gather); the supports of the others made dense.
    limit = planner.max_density(backend, differentiable)
    routed, levels = [], []
    for e, gate in enumerate(gates):
        if isinstance(gate, SparseGate):
            if gate.k / gate.n_experts <= limit and planner.worth_gathering(
                e, batch_size, backend, differentiable
            ):
                levels.append(e)
            else:
                gate = densify(gate)
        routed.append(gate)
    return routed, tuple(levels)


def _check_gates(
    network: Network, gates: Any, batch_shape: tuple[int, ...], backend: str, dtype: Any
) -> list[Tensor]:
    if type(gates) is list or type(gates) is tuple:
        dims = network.expert_dims
        if len(gates) == len(dims) and _fits(gates, dims, batch_shape, backend, dtype):
            return list(gates)  # the common case, checked without building messages
    elif is_tensor(gates, backend) or isinstance(gates, SparseGate):
        if network.n_levels != 1:
            raise TypeError(
                f"gates must be a list of {network.n_levels} tensors, one per expert level "
                f"({', '.join(network.expert_legs)}); got a single tensor"
            )
        gates = [gates]
    elif not isinstance(gates, Sequence):
        raise TypeError(
            f"gates must be a list of {network.n_levels} tensor(s), got {type(gates).__qualname__}"
        )
    if len(gates) != network.n_levels:
        raise ValueError(
            f"network has {network.n_levels} expert level(s) ({', '.join(network.expert_legs)}) "
            f"but {len(gates)} gate tensor(s) were given"
        )
    for e, (gate, n) in enumerate(zip(gates, network.expert_dims, strict=True)):
        if isinstance(gate, SparseGate):
            _check_support(gate, e, network.expert_legs[e], n, batch_shape, backend, dtype)
            continue
        gate_shape = check_tensor(gate, f"gates[{e}]", backend, dtype)
        if gate_shape != (*batch_shape, n):
            raise ValueError(
                f"gates[{e}] must have shape {(*batch_shape, n)} (the batch shape of x, "
                f"{batch_shape}, then {network.expert_legs[e]}={n}), got {gate_shape}"
            )
    return list(gates)


def _check_support(
    gate: SparseGate,
    e: int,
    leg: str,
    n: int,
    batch_shape: tuple[int, ...],
    backend: str,
    dtype: Any,
) -> None:
    if gate.n_experts != n:
        raise ValueError(
            f"gates[{e}] is a support over {gate.n_experts} experts, but {leg} has {n}"
        )
    values_shape = check_tensor(gate.values, f"gates[{e}].values", backend, dtype)
    if not is_tensor(gate.indices, backend):
        raise TypeError(
            f"gates[{e}].indices must be a tensor of the {backend!r} backend, got "
            f"{type(gate.indices).__qualname__}"
        )
    kind = str(gate.indices.dtype)
    if not kind.endswith(("int64", "int32")) or kind.endswith(("uint64", "uint32")):
        raise TypeError(f"gates[{e}].indices must be int64 or int32, got {kind}")
    indices_shape = tuple(gate.indices.shape)
    if indices_shape != values_shape or indices_shape[:-1] != batch_shape:
        raise ValueError(
            f"gates[{e}] must hold indices and values of one shape (*{batch_shape}, k) (the "
            f"batch shape of x, then the support size), got indices {indices_shape} and "
            f"values {values_shape}"
        )
    if not indices_shape[-1]:
        raise ValueError(
            f"gates[{e}] has an empty support (k = 0): give at least one entry per row "
            "(an entry of value 0 stands for all-zero coefficients)"
        )


def _fits(
    gates: Sequence[Any],
    expert_dims: tuple[int, ...],
    batch_shape: tuple[int, ...],
    backend: str,
    dtype: Any,
) -> bool:
    # Is every gate a tensor of the backend and dtype of x, shaped (*batch_shape, N_e)?
    # (A shape compares equal to a tuple on every backend: torch.Size is a tuple.)
    for gate, n in zip(gates, expert_dims, strict=True):  # lengths checked by the caller
        if not is_tensor(gate, backend) or gate.dtype != dtype or gate.shape != (*batch_shape, n):
            return False
    return True


def _time(
    plan: Plan,
    network: Network,
    gates: list[Tensor],
    rows: Tensor,
    cores: Sequence[Tensor],
    differentiable: bool,
    repeats: int = 3,
) -> float:
    # Autotuning: the best of a few runs of a candidate plan on the real operands.
    run_plan(plan, network, gates, rows, cores, differentiable)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run_plan(plan, network, gates, rows, cores, differentiable)
        best = min(best, time.perf_counter() - start)
    return best


def materialize(network: Network, cores: Sequence[Tensor]) -> Tensor:
    r"""The dense weight tensor :math:`\mathcal{W}` of all experts.

    For tests and inspection: it has ``network.n_dense_params`` entries.

    Parameters
    ----------
    network : Network
    cores : sequence of tensors
        One tensor per core, of shapes ``network.core_shapes``.

    Returns
    -------
    tensor, shape (N_1, ..., N_E, I', O)
        In the reference mode order: experts, input (with the bias slice
        last when ``network.bias``), output; a split input or output is
        given as one mode (:func:`~mumoe.functional.matrix_form`).

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp
    >>> net = cp(3, 2, expert_dims=4, rank=1, bias=False)
    >>> cores = [np.ones((4, 1)), np.ones((3, 1)), np.ones((2, 1))]
    >>> materialize(net, cores).shape
    (4, 3, 2)
    """
    dtype = check_cores(network, cores, tl.get_backend())
    return matrix_form(network, planner_of(network).materialize(tl.get_backend(), dtype)(*cores))


class ExpertWeight(NamedTuple):
    """The affine map of one expert: ``y = x @ weight + bias``.

    Parameters
    ----------
    weight : tensor, shape (I, O)
    bias : tensor, shape (O,), or None
        None for a network without bias.

    Examples
    --------
    >>> from mumoe import cp, expert_weight, random_cores
    >>> net = cp(3, 2, expert_dims=4, rank=5)
    >>> w = expert_weight(net, random_cores(net, random_state=0), 1)
    >>> w.weight.shape, w.bias.shape
    ((3, 2), (2,))
    """

    #: shape (I, O)
    weight: Tensor
    #: shape (O,), or None for a network without bias
    bias: Tensor | None


def expert_weight(
    network: Network, cores: Sequence[Tensor], index: int | Sequence[int]
) -> ExpertWeight:
    r"""The weight matrix and bias of one expert, without materialising :math:`\mathcal{W}`.

    Each expert leg is indexed in its core, then the remaining network is
    contracted into :math:`\mathcal{W}[n_1, \dots, n_E, :, :]`.

    Parameters
    ----------
    network : Network
    cores : sequence of tensors
        One tensor per core, of shapes ``network.core_shapes``.
    index : int or sequence of int
        The expert, one index per expert level (an int with one level).
        Negative indices count from the end, as in Python.

    Returns
    -------
    ExpertWeight
        ``weight`` of shape (I, O) and ``bias`` of shape (O,) (``None``
        without bias).

    Raises
    ------
    ValueError
        If ``index`` has the wrong length or is out of range.

    Examples
    --------
    >>> from mumoe import tr, random_cores
    >>> net = tr(5, 2, expert_dims=(4, 3), rank=2)
    >>> w = expert_weight(net, random_cores(net, random_state=0), (3, 0))
    >>> w.weight.shape, w.bias.shape
    ((5, 2), (2,))
    """
    dtype = check_cores(network, cores, tl.get_backend())
    indices = (index,) if isinstance(index, int | np.integer) else tuple(index)
    if len(indices) != network.n_levels:
        raise ValueError(
            f"index must give one expert per level ({network.n_levels}: "
            f"{', '.join(network.expert_legs)}), got {index!r}"
        )
    position = {}
    for leg, n, idx in zip(network.expert_legs, network.expert_dims, indices, strict=True):
        if isinstance(idx, bool) or not isinstance(idx, int | np.integer):
            raise TypeError(f"expert index for {leg} must be an int, got {idx!r}")
        if not -n <= idx < n:
            raise ValueError(f"expert index {idx} is out of range for {leg} of size {n}")
        position[leg] = int(idx) % n

    sliced = []
    for core, legs in zip(cores, network.core_legs, strict=True):
        key = tuple(position.get(leg, slice(None)) for leg in legs)
        sliced.append(core[key] if any(leg in position for leg in legs) else core)
    matrix = planner_of(network).expert(tl.get_backend(), dtype)(*sliced)
    matrix = matrix_form(network, matrix)
    if not network.bias:
        return ExpertWeight(matrix, None)
    return ExpertWeight(matrix[: network.in_features], matrix[network.in_features])


def scale_experts(
    network: Network, cores: Sequence[Tensor], level: int, scales: Any
) -> list[Tensor]:
    r"""Cores whose weight tensor has the experts of one level rescaled.

    Returns the cores of
    :math:`\mathcal{W}'[\dots, n_e, \dots] = s_{n_e}\,\mathcal{W}[\dots, n_e, \dots]`.
    :math:`\mathcal{W}` is linear in each core, so multiplying one core that
    holds the expert leg (the first, where several share it as an open
    hyperedge) along the leg is exact for every network; the other cores are
    returned as they are (not copied).  A scale
    of 0 switches an expert off; it is then as if its gate coefficient were 0
    (the other coefficients are *not* renormalised).

    Parameters
    ----------
    network : Network
    cores : sequence of tensors
        One tensor per core, of shapes ``network.core_shapes``.
    level : int
        The expert level ``e`` (0-based; ``n1`` is level 0).
    scales : array-like, shape (N_e,)
        One factor per expert of that level (converted to the cores' backend,
        dtype and device).

    Returns
    -------
    list of tensors
        New cores; the inputs are not modified.

    Raises
    ------
    ValueError
        If ``level`` is out of range, or ``scales`` does not have shape
        ``(N_e,)`` or holds a non-finite value.

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, random_cores
    >>> net = cp(3, 2, expert_dims=4, rank=5)
    >>> cores = random_cores(net, random_state=0)
    >>> off = scale_experts(net, cores, 0, [1, 0, 1, 1])  # switch expert 1 off
    >>> bool(np.all(materialize(net, off)[1] == 0))
    True
    """
    check_cores(network, cores, tl.get_backend())
    level = check_level(level, network)
    leg = network.expert_legs[level]
    n = network.expert_dims[level]
    if is_tensor(scales, tl.get_backend()):
        scales = tl.to_numpy(scales)
    host = np.asarray(scales, dtype=np.float64)
    if host.shape != (n,):
        raise ValueError(f"scales for {leg} must have shape ({n},), got {host.shape}")
    index = next(k for k, legs in enumerate(network.core_legs) if leg in legs)
    core = cores[index]
    check_scales(host, f"scales for {leg}", core.dtype)
    axis = network.core_legs[index].index(leg)
    shape = [1] * tl.ndim(core)
    shape[axis] = n
    factor = tl.tensor(host.reshape(shape), **creation_context(core))
    scaled = list(cores)
    scaled[index] = core * factor
    return scaled


def random_cores(
    network: Network,
    *,
    std: float | None = None,
    random_state: int | np.random.RandomState | None = None,
    **context: Any,
) -> list[Tensor]:
    r"""Random cores whose contraction has entries of standard deviation ``std``.

    Every core entry is drawn from :math:`\mathcal{N}(0, \sigma^2)` with

    .. math::
        \sigma = \Bigl(\mathrm{std}^2 \big/ \textstyle\prod_{\text{bonds } b} R_b
        \Bigr)^{1 / (2K)}

    for :math:`K` cores: an entry of :math:`\mathcal{W}` is a sum of
    :math:`\prod_b R_b` uncorrelated products of :math:`K` entries, so its
    variance is exactly :math:`\mathrm{std}^2`, whatever the factorisation.

    Parameters
    ----------
    network : Network
    std : float, optional
        Standard deviation of the entries of :math:`\mathcal{W}`; defaults to
        :math:`1/\sqrt{I}` (LeCun's scale for a linear map).
    random_state : None, int or numpy.random.RandomState
        Seed, as for ``tl.check_random_state``; the same seed gives the same
        values on every backend.
    **context
        Passed to ``tl.tensor`` (``dtype``, ``device``, ...); by default the
        backend's conversion of float64.

    Returns
    -------
    list of tensors
        Of shapes ``network.core_shapes``, on the active backend.

    Examples
    --------
    >>> from mumoe import cp
    >>> [tuple(c.shape) for c in random_cores(cp(3, 2, expert_dims=4, rank=5), random_state=0)]
    [(4, 5), (4, 5), (2, 5)]
    """
    if std is None:
        std = 1.0 / math.sqrt(network.in_features)
    if not isinstance(std, int | float) or isinstance(std, bool) or not std > 0:
        raise ValueError(f"std must be a positive number, got {std!r}")
    n_terms = math.prod(network.ranks.values())
    scale = (std**2 / n_terms) ** (1.0 / (2 * network.n_cores))
    rng = tl.check_random_state(random_state)
    return [
        tl.tensor(rng.standard_normal(shape) * scale, **context) for shape in network.core_shapes
    ]
