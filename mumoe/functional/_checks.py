"""Checks of the operands the functional core is handed for one network: its cores, its levels.

Each names what was expected and what came (``cores[1] (legs i r) must have
shape (9, 3), got (8, 3)``); nothing is converted or broadcast.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

from mumoe.spec import Network
from mumoe.typing import Tensor
from mumoe.validation import check_tensor, is_tensor

__all__ = ["check_cores", "check_level"]


def check_level(level: Any, network: Network) -> int:
    """Return ``level`` if it names an expert level of ``network`` (0-based), else raise.

    Parameters
    ----------
    level : int-like
    network : Network

    Returns
    -------
    int

    Raises
    ------
    TypeError
        If ``level`` is a bool or not an integer.
    ValueError
        If it is out of range.

    Examples
    --------
    >>> from mumoe import cp
    >>> check_level(1, cp(5, 2, expert_dims=(4, 3), rank=2))
    1
    """
    where = f"in [0, {network.n_levels}), got {level!r} (expert legs {network.expert_legs})"
    if isinstance(level, bool):
        raise TypeError(f"level must be an int {where}")
    try:
        index = operator.index(level)
    except TypeError:
        raise TypeError(f"level must be an int {where}") from None
    if not 0 <= index < network.n_levels:
        raise ValueError(f"level must be an int {where}")
    return index


def check_cores(network: Network, cores: Sequence[Tensor], backend: str, dtype: Any = None) -> Any:
    """Check that ``cores`` fit ``network``: count, backend, dtype and shapes.

    The cores must have ``dtype`` (that of ``x``) if it is given, else the
    dtype of ``cores[0]``.

    Parameters
    ----------
    network : Network
    cores : sequence of tensors
    backend : str
        The active TensorLy backend's name.
    dtype : dtype, optional

    Returns
    -------
    dtype
        The dtype of the cores (``dtype`` if given, else that of ``cores[0]``).

    Raises
    ------
    TypeError
        If ``cores`` is not a sequence of tensors of the active backend with
        one dtype.
    ValueError
        If the number of cores or the shape of a core is wrong.

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp
    >>> net = cp(3, 2, expert_dims=4, rank=2)
    >>> check_cores(net, [np.ones(s) for s in net.core_shapes], "numpy")
    dtype('float64')
    """
    listed = isinstance(cores, Sequence) or (  # a torch ParameterList is not a Sequence
        hasattr(cores, "__len__") and hasattr(cores, "__iter__") and hasattr(cores, "__getitem__")
    )
    if is_tensor(cores, backend) or isinstance(cores, str | bytes | Mapping) or not listed:
        raise TypeError(
            f"cores must be a sequence of {network.n_cores} tensors (a list, tuple or torch "
            f"ParameterList), got {type(cores).__qualname__}"
        )
    if len(cores) != network.n_cores:
        raise ValueError(
            f"network {network.spec!r} has {network.n_cores} cores, got {len(cores)} tensors"
        )
    like = "x" if dtype is not None else "cores[0]"
    for k, (core, legs, expected) in enumerate(
        zip(cores, network.core_legs, network.core_shapes, strict=True)
    ):
        shape = check_tensor(core, f"cores[{k}]", backend, dtype, like)
        if dtype is None:
            dtype = core.dtype
        if shape != expected:
            raise ValueError(
                f"cores[{k}] (legs {' '.join(legs)}) must have shape {expected}, got {shape}"
            )
    return dtype
