r"""Split input and output legs: rows to legs and back, and the two forms of ``W``.

A network whose spec splits the input into legs ``i1 ... iK`` contracts the
input as a ``(B, I_1', I_2, ..., I_K)`` operand, ``x`` reshaped row-major to
:attr:`~mumoe.spec.Network.in_shape` with the bias slice on the first leg:
:math:`z[b, I_1, 0, \dots, 0] = 1` and zeros in the rest of that slice
(:func:`input_operand`); a split output comes out as ``(B, O_1, ..., O_L)``
and is reshaped to ``(B, O)`` (:func:`run_plan`).  ``W`` has two forms: as
the network holds it, :attr:`~mumoe.spec.Network.tensor_shape` (one axis per
leg), and as the layer applies it, :attr:`~mumoe.spec.Network.weight_shape`
``(N..., I', O)``; :func:`matrix_form` and :func:`tensor_form` convert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorly as tl

from mumoe.backends import creation_context
from mumoe.plan import Plan
from mumoe.spec import Network
from mumoe.typing import Tensor

__all__ = ["input_operand", "matrix_form", "run_plan", "tensor_form"]


def input_operand(network: Network, rows: Tensor) -> Tensor:
    """The input operand of a network that splits its input: ``(B, *input_sizes)``.

    Parameters
    ----------
    network : Network
        A network with :attr:`~mumoe.spec.Network.splits_input`.
    rows : tensor, shape (B, I)

    Returns
    -------
    tensor, shape ``(B, I_1', I_2, ..., I_K)``
        ``rows`` reshaped row-major; with a bias, the slice ``I_1`` of the
        first leg is one at ``(I_1, 0, ..., 0)`` and zero elsewhere.

    Examples
    --------
    >>> from mumoe import cp
    >>> net = cp(6, 2, expert_dims=3, rank=2, in_shape=(3, 2))
    >>> input_operand(net, np.arange(6.0).reshape(1, 6))[0]
    array([[0., 1.],
           [2., 3.],
           [4., 5.],
           [1., 0.]])
    """
    batch_size = rows.shape[0]
    legs = tl.reshape(rows, (batch_size, *network.in_shape))
    if not network.bias:
        return legs
    rest = network.in_shape[1:]
    context = creation_context(rows)
    one = tl.ones((batch_size, 1), **context)
    zeros = tl.zeros((batch_size, math.prod(rest) - 1), **context)
    slab = tl.reshape(tl.concatenate([one, zeros], axis=1), (batch_size, 1, *rest))
    return tl.concatenate([legs, slab], axis=1)


def run_plan(
    plan: Plan,
    network: Network,
    before: Sequence[Tensor],
    rows: Tensor,
    after: Sequence[Tensor],
    differentiable: bool,
) -> Tensor:
    """One call of a forward plan of ``network`` on ``(B, I)`` rows: ``(B, O)``.

    An unsplit input goes to :meth:`Plan.run <mumoe.plan.Plan.run>` (the
    bias rule); a split one as :func:`input_operand`.  A split output is
    reshaped to ``(B, O)``.

    Parameters
    ----------
    plan : Plan
        A forward plan (dense or sparse) of ``network``.
    network : Network
    before : sequence of tensors
        The operands before the input (gates).
    rows : tensor, shape (B, I)
    after : sequence of tensors
        The operands after it (cores).
    differentiable : bool
        Whether gradients flow to the cores (the bias rule).

    Returns
    -------
    tensor, shape (B, O)

    Examples
    --------
    >>> from mumoe import planner_of, random_cores, ttm
    >>> net = ttm(6, 4, expert_dims=3, rank=2, in_shape=(3, 2), out_shape=(2, 2))
    >>> plan = planner_of(net).forward(5, "numpy", "float64")
    >>> run_plan(plan, net, [np.ones((5, 3))], np.ones((5, 6)), random_cores(net), False).shape
    (5, 4)
    """
    if network.splits_input:
        out = plan.program((*before, input_operand(network, rows), *after))
    else:
        out = plan.run(before, rows, after, bias=network.bias, differentiable=differentiable)
    if network.splits_output:
        return tl.reshape(out, (rows.shape[0], network.out_features))
    return out


def matrix_form(network: Network, tensor: Tensor) -> Tensor:
    """``W`` from the network's legs to ``(..., I', O)``: every expert's ``[W_n^T; b_n]``.

    Parameters
    ----------
    network : Network
    tensor : tensor, shape ``(..., *input_sizes, *out_shape)``
        Any leading axes (the experts, or none).

    Returns
    -------
    tensor, shape (..., I', O)
        The bias row, where there is one, is the slice ``(I_1, 0, ..., 0)``
        of the input legs; the other entries of that slice are dropped.
        ``tensor`` itself for a network that splits neither mode.

    Examples
    --------
    >>> from mumoe import cp
    >>> net = cp(6, 4, expert_dims=3, rank=2, in_shape=(3, 2), out_shape=(2, 2))
    >>> matrix_form(net, np.zeros((3, 4, 2, 2, 2))).shape
    (3, 7, 4)
    """
    if not network.splits:
        return tensor
    n_legs = len(network.input_legs) + len(network.output_legs)
    lead = tuple(tensor.shape[: len(tensor.shape) - n_legs])
    first, rest = network.input_sizes[0], math.prod(network.in_shape[1:])
    grid = tl.reshape(tensor, (*lead, first, rest, network.out_features))
    if not network.bias:
        return tl.reshape(grid, (*lead, network.in_features, network.out_features))
    body = tl.reshape(grid[..., : first - 1, :, :], (*lead, network.in_features, -1))
    bias = grid[..., first - 1 : first, 0, :]
    return tl.concatenate([body, bias], axis=-2)


def tensor_form(network: Network, matrix: Any) -> np.ndarray:
    """``W`` from ``(..., I', O)`` to the network's legs, in float64 NumPy (undoes matrix_form).

    The entries of the bias slice that :func:`matrix_form` drops are zero.

    Parameters
    ----------
    network : Network
    matrix : array, shape (..., I', O)

    Returns
    -------
    numpy.ndarray, shape ``(..., *input_sizes, *out_shape)``
        float64; the same shape for a network that splits neither mode.

    Examples
    --------
    >>> from mumoe import cp
    >>> net = cp(6, 4, expert_dims=3, rank=2, in_shape=(3, 2), out_shape=(2, 2))
    >>> m = np.random.default_rng(0).normal(size=(3, 7, 4))
    >>> w = tensor_form(net, m)
    >>> w.shape, bool(np.array_equal(matrix_form(net, w), m))
    ((3, 4, 2, 2, 2), True)
    """
    m = np.asarray(matrix, dtype=np.float64)
    if not network.splits:
        return m
    lead = m.shape[:-2]
    rest = math.prod(network.in_shape[1:])
    grid = m[..., : network.in_features, :].reshape(*lead, network.in_shape[0], rest, -1)
    if network.bias:
        slab = np.zeros((*lead, 1, rest, network.out_features))
        slab[..., 0, 0, :] = m[..., network.in_features, :]
        grid = np.concatenate([grid, slab], axis=-3)
    return grid.reshape(*lead, *network.input_sizes, *network.out_shape)
