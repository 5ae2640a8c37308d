"""Sums over a ``torch.distributed`` process group, for the gates' statistics and losses.

:func:`mumoe.gates.usage` and the balance losses take ``reduce``, a sum over
processes of their per-expert sums and token counts; here it is an
all-reduce over a group, differentiable for the losses (its backward sums
the gradients over the group too, as DDP then averages them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["check_process_group", "group_sum"]


def check_process_group(
    process_group: dist.ProcessGroup | bool | None, what: str = "process_group"
) -> dist.ProcessGroup | None:
    """The group that ``process_group`` names: None (no reduction), or a ``ProcessGroup``.

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup, bool or None
        A group; ``True`` for the default (WORLD) group; None or ``False``
        for none.
    what : str, default "process_group"
        The argument's name, for the messages.

    Returns
    -------
    torch.distributed.ProcessGroup or None

    Raises
    ------
    TypeError
        For anything else.
    RuntimeError
        If a group is asked for and ``torch.distributed`` is not initialised.

    Examples
    --------
    >>> check_process_group(None) is None
    True
    """
    if process_group is None or process_group is False:
        return None
    group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if process_group is not True and not (
        group_type is not None and isinstance(process_group, group_type)
    ):
        raise TypeError(
            f"{what} must be a torch.distributed.ProcessGroup, True (the default group) "
            f"or None (this process alone), got {type(process_group).__name__}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what}={process_group!r} sums over processes, but torch.distributed is not "
            "initialised: call torch.distributed.init_process_group first, or pass None"
        )
    return dist.group.WORLD if process_group is True else process_group


class _GroupSum(torch.autograd.Function):
    """All-reduce (SUM) whose backward all-reduces the gradient too.

    Each rank's loss depends on every rank's input: the gradient of the sum of
    the ranks' losses, which DDP then averages.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def group_sum(
    group: dist.ProcessGroup | None, *, differentiable: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The sum over ``group``'s processes, as the ``reduce`` of :func:`mumoe.gates.usage`.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup
        From :func:`check_process_group`.
    differentiable : bool
        Through autograd (its backward is an all-reduce too, which every
        process must then run), or on a detached copy (statistics).

    Returns
    -------
    callable
        From a tensor to its sum over the group (a new tensor).

    Examples
    --------
    >>> callable(group_sum(None, differentiable=False))  # called only once initialised
    True
    """
    if differentiable:
        return lambda tensor: _GroupSum.apply(tensor, group)

    def detached(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return detached
