"""Torch kernels that ``mumoe/backends/pytorch.toml`` declares for the backend-agnostic core.

:func:`bias_matmul` adds the input's bias inside the contraction,
``x @ core[:I] + core[I]``, with a backward pass that writes the core's
gradient once.  Slicing the core in autograd instead (``torch.addmm(core[I],
x, core[:I])``) makes each slice's backward a zero-filled gradient of the
whole core, and concatenating a column of ones to ``x`` keeps a copy of
``x`` for the backward pass; this kernel does neither.

:func:`gather_sum_by_embedding_bag` and :func:`scatter_rows` serve sparse gates
(:class:`mumoe.typing.SparseGate`): the weighted sum of the ``k`` rows of a
core a row's support names, by ``embedding_bag``, and a support's dense rows.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["bias_matmul", "gather_sum_by_embedding_bag", "kth_largest", "scatter_rows"]


class _BiasMatmul(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        return torch.addmm(core[k], x, core[:k])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, core = ctx.saved_tensors
        k = x.shape[-1]
        grad_x = grad @ core[:k].T if ctx.needs_input_grad[0] else None
        grad_core = None
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: differentiable ops only
                grad_core = torch.cat([x.T @ grad, grad.sum(0, keepdim=True)])
            else:
                grad_core = torch.empty_like(core)
                torch.mm(x.T, grad, out=grad_core[:k])
                torch.sum(grad, 0, out=grad_core[k])
        return grad_x, grad_core


def bias_matmul(x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``x @ core[:I] + core[I]`` in one ``addmm``, its core gradient written once.

    Parameters
    ----------
    x : torch.Tensor, shape (B, I)
    core : torch.Tensor, shape (I + 1, N)
        The core along the input leg, its last row the bias slice.

    Returns
    -------
    torch.Tensor, shape (B, N)

    Raises
    ------
    ValueError
        If ``core`` does not have one row more than ``x`` has columns.

    Examples
    --------
    >>> import torch
    >>> x, core = torch.ones(2, 3), torch.arange(8.0).reshape(4, 2)
    >>> bias_matmul(x, core)
    tensor([[12., 16.],
            [12., 16.]])
    """
    if x.ndim != 2 or core.ndim != 2 or core.shape[0] != x.shape[1] + 1:
        raise ValueError(
            f"bias_matmul expects x of shape (B, I) and core of shape (I + 1, N); "
            f"got {tuple(x.shape)} and {tuple(core.shape)}"
        )
    k = x.shape[1]
    if not (torch.is_grad_enabled() and (x.requires_grad or core.requires_grad)):
        return torch.addmm(core[k], x, core[:k])  # no graph: skip autograd.Function's cost
    return _BiasMatmul.apply(x, core)


def kth_largest(z: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of each row, by ``torch.topk`` (no full sort), detached.

    The ``kth_largest`` kernel of top-k gating (:func:`mumoe.gates.topk`).

    Parameters
    ----------
    z : torch.Tensor, shape (..., N)
    k : int
        From 1 to N.

    Returns
    -------
    torch.Tensor, shape (..., 1)

    Examples
    --------
    >>> import torch
    >>> kth_largest(torch.tensor([[3.0, 9.0, 1.0, 7.0]]), 2)
    tensor([[7.]])
    """
    return torch.topk(z.detach(), k, dim=-1).values[..., k - 1 : k]


def gather_sum_by_embedding_bag(
    table: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``sum_j values[b, j] * table[indices[b, j]]``: torch's ``gather_sum`` kernel.

    ``torch.nn.functional.embedding_bag`` in ``"sum"`` mode with per-sample
    weights, on the CPU and CUDA: no ``(B, k, D)`` copy of the gathered rows,
    and a backward pass that accumulates into the gathered rows only.

    Parameters
    ----------
    table : torch.Tensor, shape (N, D)
    indices : torch.Tensor, shape (B, k), integer
    values : torch.Tensor, shape (B, k)
        Of the table's dtype.

    Returns
    -------
    torch.Tensor, shape (B, D)

    Examples
    --------
    >>> import torch
    >>> table = torch.arange(6.0).reshape(3, 2)
    >>> gather_sum_by_embedding_bag(table, torch.tensor([[2, 0]]), torch.tensor([[1.0, 0.5]]))
    tensor([[4.0000, 5.5000]])
    """
    return torch.nn.functional.embedding_bag(indices, table, mode="sum", per_sample_weights=values)


def scatter_rows(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """Dense rows ``(B, n)`` holding ``values`` at ``indices``: the ``scatter_rows`` kernel.

    Repeated indices add up (``scatter_add``), as a gather does.

    Parameters
    ----------
    values : torch.Tensor, shape (B, k)
    indices : torch.Tensor, shape (B, k), integer
    n : int

    Returns
    -------
    torch.Tensor, shape (B, n)
        Differentiable in ``values``.

    Examples
    --------
    >>> import torch
    >>> scatter_rows(torch.tensor([[0.5, 0.5]]), torch.tensor([[2, 0]]), 3)
    tensor([[0.5000, 0.0000, 0.5000]])
    """
    out = values.new_zeros((values.shape[0], n))
    return out.scatter_add(1, indices, values)
