r"""The sparse forward pass: levels given by their supports gather rows of their cores.

For a level given as a :class:`~mumoe.typing.SparseGate`, the contraction of
its gate with the core holding its expert leg,
:math:`\sum_{n} a_{bn}\, G[\dots, n, \dots]`, runs over the ``k`` entries of
each row's support only: :func:`gather_sum`, a weighted gather of ``k``
slices of the core (``embedding_bag`` on torch, whose backward accumulates
into those slices only), instead of a product with ``N - k`` zeros.  The
rest of the network is contracted by a compiled plan of the reduced network
(:meth:`mumoe.plan.Planner.sparse_forward`).  Exact: a sparse gate stands for
dense coefficients that are zero off its support.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorly as tl

from mumoe.backends import backend_function
from mumoe.functional._legs import run_plan
from mumoe.plan import Planner, SparseLayout
from mumoe.typing import SparseGate, Tensor

__all__ = [
    "contract_sparse",
    "dense_gates",
    "densify",
    "gather_core",
    "gather_sum",
    "gather_sum_by_csr",
]

Gate = Tensor | SparseGate


def densify(gate: Gate) -> Tensor:
    """The dense coefficients ``(..., N)`` a :class:`~mumoe.typing.SparseGate` stands for.

    Dense coefficients are returned as they are.

    Parameters
    ----------
    gate : SparseGate or tensor

    Returns
    -------
    tensor, shape (..., N)
        Differentiable in ``gate.values`` where the backend is.

    Examples
    --------
    >>> import numpy as np
    >>> densify(SparseGate(np.array([[2, 0]]), np.array([[0.75, 0.25]]), 4))
    array([[0.25, 0.  , 0.75, 0.  ]])
    """
    if not isinstance(gate, SparseGate):
        return gate
    lead = tuple(gate.indices.shape[:-1])
    k = gate.k
    rows = math.prod(lead)
    scatter = backend_function(tl.get_backend(), "scatter_rows")
    if scatter is None:
        raise ValueError(
            f"sparse gates on backend {tl.get_backend()!r} need a scatter_rows kernel in "
            "mumoe/backends/"
        )
    dense = scatter(
        tl.reshape(gate.values, (rows, k)), tl.reshape(gate.indices, (rows, k)), gate.n_experts
    )
    return tl.reshape(dense, (*lead, gate.n_experts))


def dense_gates(gates: Sequence[Gate]) -> list[Tensor]:
    """Every level's coefficients as a dense tensor (:func:`densify` where sparse).

    Parameters
    ----------
    gates : sequence of SparseGate or tensors

    Returns
    -------
    list of tensors, each (..., N_e)

    Examples
    --------
    >>> import numpy as np
    >>> [g.shape for g in dense_gates([np.ones((2, 3)), SparseGate(np.zeros((2, 1), int),
    ...                                                             np.ones((2, 1)), 5)])]
    [(2, 3), (2, 5)]
    """
    return [densify(gate) for gate in gates]


def gather_sum(core: Tensor, axis: int, indices: Tensor, values: Tensor) -> Tensor:
    r"""A core contracted with a support along its expert leg: :math:`\sum_j v_{bj} G[n_{bj}]`.

    Parameters
    ----------
    core : tensor
        Any core.
    axis : int
        The axis of the expert leg.
    indices : integer tensor, shape (B, k)
    values : tensor, shape (B, k)

    Returns
    -------
    tensor, shape (B, ...)
        The core's shape without ``axis``, after the batch.
        The backend's ``gather_sum`` kernel where it declares one
        (``embedding_bag`` on torch), on the core with its expert leg brought
        first; else a take and a batched product (along another axis than the
        first, a take, a transposition of the ``B * k`` slices taken, and a
        batched product: no copy of the core).

    Examples
    --------
    >>> import numpy as np
    >>> core = np.arange(12.0).reshape(2, 3, 2)  # (r, n, r)
    >>> gather_sum(core, 1, np.array([[2, 0]]), np.array([[1.0, 0.5]])).shape
    (1, 2, 2)
    """
    shape = tuple(core.shape)
    rest = shape[:axis] + shape[axis + 1 :]
    rows, k = indices.shape
    width = math.prod(rest)
    kernel = backend_function(tl.get_backend(), "gather_sum")
    if kernel is not None:
        # The kernel reads rows of a table: the expert leg first (a copy of the core
        # where it is not, cheaper in a backward pass than scattering into its slices).
        table = (
            core
            if axis == 0
            else tl.transpose(core, (axis, *range(axis), *range(axis + 1, len(shape))))
        )
        table = tl.reshape(table, (shape[axis], width))
        return tl.reshape(kernel(table, indices, values), (rows, *rest))
    if axis == 0:
        picked = tl.reshape(core, (shape[0], width))[indices]  # (B, k, D)
    else:
        picked = core[(slice(None),) * axis + (indices,)]  # (..., B, k, ...)
        perm = (axis, axis + 1, *range(axis), *range(axis + 2, len(shape) + 1))
        picked = tl.reshape(tl.transpose(picked, perm), (rows, k, width))
    summed = tl.reshape(values, (rows, 1, k)) @ picked
    return tl.reshape(summed, (rows, *rest))


def gather_sum_by_csr(table: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """The ``gather_sum`` kernel of NumPy: the supports as a CSR matrix times the table.

    ``scipy.sparse``'s CSR product reads the ``k`` rows each row names, in
    compiled code, with no ``(B, k, D)`` copy.

    Parameters
    ----------
    table : numpy.ndarray, shape (N, D)
    indices : numpy.ndarray, shape (B, k), integer
    values : numpy.ndarray, shape (B, k)

    Returns
    -------
    numpy.ndarray, shape (B, D)

    Examples
    --------
    >>> import numpy as np
    >>> table = np.arange(6.0).reshape(3, 2)
    >>> gather_sum_by_csr(table, np.array([[2, 0]]), np.array([[1.0, 0.5]]))
    array([[4. , 5.5]])
    """
    from scipy import sparse

    rows, k = indices.shape
    pointers = np.arange(0, rows * k + 1, k)
    matrix = sparse.csr_matrix(
        (values.ravel(), indices.ravel(), pointers), shape=(rows, table.shape[0])
    )
    return np.asarray(matrix @ table)


def gather_core(core: Tensor, axes: Sequence[int], indices: Sequence[Tensor]) -> Tensor:
    """A core indexed at several supports: ``(B, k_1, ..., k_s, rest)``.

    Parameters
    ----------
    core : tensor
    axes : sequence of int
        The axes of the sparse legs, one per support.
    indices : sequence of integer tensors, each (B, k_j)

    Returns
    -------
    tensor, shape (B, k_1, ..., k_s, ...)
        The supports' legs, then the core's other axes in order: the sparse
        legs brought to the front (a view where the backend allows), then one
        advanced index with the supports broadcast.

    Examples
    --------
    >>> import numpy as np
    >>> core = np.zeros((4, 5, 3))  # (n1, n2, o)
    >>> gather_core(core, (0, 1), [np.zeros((2, 3), int), np.zeros((2, 2), int)]).shape
    (2, 3, 2, 3)
    """
    order = (*axes, *(a for a in range(tl.ndim(core)) if a not in axes))
    if order != tuple(range(len(order))):
        core = tl.transpose(core, order)
    s = len(axes)
    broadcast = []
    for j, index in enumerate(indices):
        shape = [index.shape[0]] + [1] * s
        shape[1 + j] = index.shape[1]
        broadcast.append(tl.reshape(index, tuple(shape)))
    return core[tuple(broadcast)]


def contract_sparse(
    planner: Planner,
    cores: Sequence[Tensor],
    rows: Tensor,
    gates: list[Tensor | SparseGate],
    levels: tuple[int, ...],
    differentiable: bool,
    backend: str,
) -> Tensor:
    """The forward contraction ``(B, O)`` with ``levels`` given as supports.

    Parameters
    ----------
    planner : Planner
    cores : sequence of tensors
    rows : tensor, shape (B, I)
        The input, leading dimensions flattened.
    gates : list
        Per level: a dense tensor ``(B, N_e)``, or a :class:`SparseGate` with
        ``(B, k)`` indices and values for the levels in ``levels``.
    levels : tuple of int
        The levels contracted from their supports (the others are dense here).
    differentiable : bool
        As for :func:`mumoe.functional.forward` (the bias rule).
    backend : str

    Returns
    -------
    tensor, shape (B, O)

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, planner_of, random_cores
    >>> net = cp(3, 2, expert_dims=8, rank=4)
    >>> gate = SparseGate(np.array([[1, 5]]), np.array([[0.5, 0.5]]), 8)
    >>> y = contract_sparse(planner_of(net), random_cores(net, random_state=0), np.ones((1, 3)),
    ...                     [gate], (0,), False, "numpy")
    >>> y.shape
    (1, 2)
    """
    network = planner.network
    batch_size = rows.shape[0]
    ks = {e: gates[e].k for e in levels}
    layout, plan = planner.sparse_forward(batch_size, backend, rows.dtype, levels, ks)
    operands = _operands(layout, cores, gates)
    before = operands[: layout.input_position]
    after = operands[layout.input_position :]
    return run_plan(plan, network, before, rows, after, differentiable)


def _operands(
    layout: SparseLayout, cores: Sequence[Tensor], gates: list[Tensor | SparseGate]
) -> list[Tensor]:
    # The layout's operands without x: dense gates, values, then the cores as laid out.
    operands = [gates[e] for e in layout.dense_levels]
    operands += [gates[e].values for e in layout.value_levels]
    fused = {core: (level, axis) for core, level, axis in layout.fused}
    gathered = dict(layout.gathered)
    for c, core in enumerate(cores):
        if c in fused:
            level, axis = fused[c]
            gate = gates[level]
            operands.append(gather_sum(core, axis, gate.indices, gate.values))
        elif c in gathered:
            pairs = gathered[c]
            operands.append(
                gather_core(core, [axis for _, axis in pairs], [gates[e].indices for e, _ in pairs])
            )
        else:
            operands.append(core)
    return operands
