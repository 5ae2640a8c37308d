"""Checks of the arrays handed to the functional core.

Every check names the operand (``x``, ``gates[1]``, ``cores[0]``), what was
expected and what came, so that a wrong call fails at the boundary rather
than deep inside an einsum.  Nothing here converts or broadcasts: an array on
another backend, of another dtype or of another shape is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorly as tl

from mumoe.network import Network
from mumoe.typing import Shape, Tensor

__all__ = ["check_cores", "check_tensor", "dtype_name", "is_floating", "is_tensor"]


def dtype_name(dtype: Any) -> str:
    """The backend-neutral name of a dtype: ``"float32"`` for NumPy's and torch's alike."""
    return str(dtype).rsplit(".", 1)[-1]


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a real or complex floating-point dtype, on any backend."""
    known = _FLOATING.get(dtype)
    if known is None:
        name = dtype_name(dtype)
        known = "float" in name or "complex" in name
        if len(_FLOATING) < 256:  # dtypes are few; the bound is a safeguard
            _FLOATING[dtype] = known
    return known


def is_tensor(array: Any, backend: str) -> bool:
    """``tl.is_tensor(array)`` for the active ``backend``, remembered per array type.

    Whether an object is a backend's tensor depends on its type only, so the
    answer is kept per ``(backend, type)``: a dictionary lookup instead of
    TensorLy's dispatch on every operand of every call.
    """
    key = (backend, type(array))
    known = _TENSOR_TYPES.get(key)
    if known is None:
        known = bool(tl.is_tensor(array))
        if len(_TENSOR_TYPES) < 256:
            _TENSOR_TYPES[key] = known
    return known


_FLOATING: dict[Any, bool] = {}
_TENSOR_TYPES: dict[tuple[str, type], bool] = {}


def check_tensor(array: Any, name: str, backend: str, dtype: Any = None, like: str = "x") -> Shape:
    """Check that ``array`` is a tensor of the active backend (and of ``dtype``).

    Parameters
    ----------
    array : object
        The operand to check.
    name : str
        How error messages call it, e.g. ``"gates[0]"``.
    backend : str
        The active TensorLy backend, ``tl.get_backend()``.
    dtype : dtype, optional
        The dtype the operand must have; any floating dtype if omitted.
    like : str, default "x"
        The operand ``dtype`` was taken from, for the error message.

    Returns
    -------
    tuple of int
        The operand's shape.

    Raises
    ------
    TypeError
        If ``array`` is not a tensor of ``backend`` or has the wrong dtype.
    """
    if not is_tensor(array, backend):
        raise TypeError(
            f"{name} is a {type(array).__module__}.{type(array).__qualname__}, not a tensor of "
            f"the active TensorLy backend {backend!r}; convert it with tl.tensor(...) or "
            "choose its backend with tl.set_backend(...)"
        )
    if dtype is None:
        if not is_floating(array.dtype):
            raise TypeError(
                f"{name} has dtype {dtype_name(array.dtype)}; μMoE layers compute in a "
                "floating-point dtype (float32, float64, ...): cast it first"
            )
    elif array.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {dtype_name(array.dtype)} but {like} has {dtype_name(dtype)}; "
            "all operands must share one dtype: cast them first"
        )
    return tuple(array.shape)


def check_cores(network: Network, cores: Sequence[Tensor], backend: str, dtype: Any = None) -> Any:
    """Check that ``cores`` fit ``network``: count, backend, dtype and shapes.

    The cores must have ``dtype`` (that of ``x``) if it is given, else the
    dtype of ``cores[0]``.

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
    """
    if is_tensor(cores, backend) or not isinstance(cores, Sequence):
        raise TypeError(
            f"cores must be a list or tuple of {network.n_cores} tensors, "
            f"got {type(cores).__qualname__}"
        )
    if len(cores) != network.n_cores:
        raise ValueError(
            f"network {network.spec!r} has {network.n_cores} cores, got {len(cores)} tensors"
        )
    like = "x" if dtype is not None else "cores[0]"
    for k, (core, legs, expected) in enumerate(
        zip(cores, network.cores, network.core_shapes, strict=True)
    ):
        shape = check_tensor(core, f"cores[{k}]", backend, dtype, like)
        if dtype is None:
            dtype = core.dtype
        if shape != expected:
            raise ValueError(
                f"cores[{k}] (legs {' '.join(legs)}) must have shape {expected}, got {shape}"
            )
    return dtype
