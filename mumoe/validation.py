"""Checks of user input: sizes and flags, and the arrays handed to the functional core.

The one home of mumoe's argument checks: a wrong type raises ``TypeError``, a
wrong value ``ValueError``, each naming what was expected and what came.
Every check names the operand (``x``, ``gates[1]``, ``cores[0]``), what was
expected and what came, so that a wrong call fails at the boundary rather
than deep inside an einsum.  Nothing here converts or broadcasts: an array on
another backend, of another dtype or of another shape is an error.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorly as tl

from mumoe.typing import Shape

__all__ = [
    "check_bool",
    "check_labels",
    "check_scales",
    "check_tensor",
    "check_tensor_type",
    "dtype_name",
    "host_array",
    "is_floating",
    "is_tensor",
    "positive_int",
    "positive_ints",
]


def positive_int(value: Any, what: str) -> int:
    """Return ``value`` as a positive int, or raise naming ``what``.

    Integers of any library (``numpy.int64`` ...) are accepted; ``bool``,
    floats and non-positive values are not.

    Parameters
    ----------
    value : int-like
    what : str
        How the error message names ``value``.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        If ``value`` is a bool or not an integer.
    ValueError
        If it is not positive.

    Examples
    --------
    >>> import numpy as np
    >>> positive_int(np.int64(3), "rank")
    3
    >>> positive_int(0, "rank")
    Traceback (most recent call last):
        ...
    ValueError: rank must be a positive int, got 0
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a positive int, got the bool {value!r}")
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a positive int, got {value!r}") from None
    if size < 1:
        raise ValueError(f"{what} must be a positive int, got {size}")
    if size >= _INT64:
        raise ValueError(
            f"{what}={size:,} is larger than any array dimension can be (sizes are int64, "
            "below 2**63)"
        )
    return size


#: Array sizes are int64 in every backend.
_INT64 = 2**63


def positive_ints(values: Any, what: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Return one int or a sequence of ints as a tuple of positive ints.

    Parameters
    ----------
    values : int-like or sequence of int-like
    what : str
        How error messages name ``values``; entries are named ``what[k]``.
    allow_empty : bool, default False

    Returns
    -------
    tuple of int

    Raises
    ------
    TypeError
        If an entry is not an integer, or ``values`` is a string.
    ValueError
        If an entry is not positive, or the sequence is empty.

    Examples
    --------
    >>> positive_ints(4, "expert_dims"), positive_ints([8, 2], "expert_dims")
    ((4,), (8, 2))
    """
    if isinstance(values, str | bytes):
        raise TypeError(f"{what} must be an int or a sequence of ints, got {values!r}")
    if not isinstance(values, Sequence):
        return (positive_int(values, what),)
    if not values and not allow_empty:
        raise ValueError(f"{what} is empty; give at least one size")
    return tuple(positive_int(v, f"{what}[{k}]") for k, v in enumerate(values))


def check_bool(value: Any, what: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False``, else raise ``TypeError``.

    Parameters
    ----------
    value : object
    what : str
        How the error message names ``value``.

    Returns
    -------
    bool

    Examples
    --------
    >>> check_bool(True, "bias")
    True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value


#: The largest finite value of each floating dtype, by name (NumPy has no bfloat16).
_LARGEST = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
    "float64": 1.7976931348623157e308,
}


def check_scales(scales: Any, what: str, dtype: Any) -> Any:
    """Check that expert scales are finite and representable in ``dtype``.

    A factor of ``1e39`` is finite in float64 and ``inf`` once cast to the
    float32 of the cores it scales: such a factor is refused, not cast.

    Parameters
    ----------
    scales : numpy.ndarray of float64
    what : str
        How the error message names them (``"scales for n1"``).
    dtype : dtype of any backend
        The dtype they will be cast to.

    Returns
    -------
    numpy.ndarray
        ``scales`` itself.

    Raises
    ------
    ValueError
        Naming the largest value ``dtype`` holds.

    Examples
    --------
    >>> import numpy as np
    >>> check_scales(np.array([1.0, 1e5]), "scales", "float16")
    Traceback (most recent call last):
    ...
    ValueError: scales must be finite in float16 (at most 65504 in magnitude), got [1.0, 100000.0]
    """
    name = dtype_name(dtype)
    largest = _LARGEST.get(name, _LARGEST["float64"])
    if not np.all(np.isfinite(scales)) or np.abs(scales).max(initial=0.0) > largest:
        raise ValueError(
            f"{what} must be finite in {name} (at most {largest:.5g} in magnitude), "
            f"got {np.asarray(scales).tolist()}"
        )
    return scales


def dtype_name(dtype: Any) -> str:
    """The backend-neutral name of a dtype: ``"float32"`` for NumPy's and torch's alike.

    Parameters
    ----------
    dtype : dtype of any backend

    Returns
    -------
    str

    Examples
    --------
    >>> import numpy as np
    >>> dtype_name(np.dtype("float32")), dtype_name(np.dtype("float16"))
    ('float32', 'float16')
    """
    return str(dtype).rsplit(".", 1)[-1]


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a real or complex floating-point dtype, on any backend.

    Parameters
    ----------
    dtype : dtype of any backend

    Returns
    -------
    bool

    Examples
    --------
    >>> import numpy as np
    >>> is_floating(np.dtype("float16")), is_floating(np.dtype("int64"))
    (True, False)
    """
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

    Parameters
    ----------
    array : object
    backend : str
        The active TensorLy backend's name.

    Returns
    -------
    bool

    Examples
    --------
    >>> import numpy as np
    >>> is_tensor(np.ones(2), "numpy"), is_tensor([1.0], "numpy")
    (True, False)
    """
    key = (backend, type(array))
    known = _TENSOR_TYPES.get(key)
    if known is None:
        known = bool(tl.is_tensor(array)) and not isinstance(array, _OTHER_SEMANTICS)
        if len(_TENSOR_TYPES) < 256:
            _TENSOR_TYPES[key] = known
    return known


#: NumPy subclasses whose operators mean something else (``*`` and ``**`` are matrix
#: products for ``np.matrix``; masked entries are skipped): refused, not computed on.
_OTHER_SEMANTICS = (np.matrix, np.ma.MaskedArray)

_FLOATING: dict[Any, bool] = {}
_TENSOR_TYPES: dict[tuple[str, type], bool] = {}


def check_tensor_type(array: Any, name: str, backend: str) -> None:
    """Check that ``array`` is a tensor of the active backend (any dtype, any shape).

    Parameters
    ----------
    array : object
    name : str
        How the error message calls it, e.g. ``"gates"``.
    backend : str
        The active TensorLy backend, ``tl.get_backend()``.

    Raises
    ------
    TypeError
        Naming the array's type, the active backend and the two ways out.

    Examples
    --------
    >>> check_tensor_type([1.0], "x", "numpy")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    TypeError: x is a builtins.list, not a tensor of the active TensorLy backend 'numpy'; ...
    """
    if isinstance(array, _OTHER_SEMANTICS):
        raise TypeError(
            f"{name} is a {type(array).__module__}.{type(array).__qualname__}, whose operators "
            "are not an ndarray's (np.matrix multiplies by *, a masked array skips entries); "
            f"pass np.asarray({name}) (filled first, for a masked array)"
        )
    if not is_tensor(array, backend):
        raise TypeError(
            f"{name} is a {type(array).__module__}.{type(array).__qualname__}, not a tensor of "
            f"the active TensorLy backend {backend!r}; convert it with tl.tensor(...) or "
            "choose its backend with tl.set_backend(...)"
        )


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

    Examples
    --------
    >>> import numpy as np
    >>> check_tensor(np.ones((2, 3)), "x", "numpy")
    (2, 3)
    >>> check_tensor(np.ones(2, dtype=int), "x", "numpy")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    TypeError: x has dtype int64; μMoE layers compute in a floating-point dtype ...
    """
    check_tensor_type(array, name, backend)
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


def host_array(array: Any) -> np.ndarray:
    """A NumPy view or copy of a NumPy, torch (any device) or CuPy array.

    Parameters
    ----------
    array : array of any library, or anything ``numpy.asarray`` reads

    Returns
    -------
    numpy.ndarray
        A view where the array is already on the host (NumPy, CPU torch), a
        copy otherwise; torch tensors are detached first, bfloat16 ones
        widened to float32.

    Examples
    --------
    >>> host_array([1.0, 2.0])
    array([1., 2.])
    """
    if hasattr(array, "detach"):  # torch
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: widened, exactly
            array = array.float()
    elif type(array).__module__.startswith("cupy"):
        array = array.get()
    return np.asarray(array)


def check_labels(labels: Any, n_samples: int, n_classes: int | None) -> tuple[np.ndarray, int]:
    """Check class labels: one non-negative integer per sample, below ``n_classes``.

    Parameters
    ----------
    labels : array of any library, shape (S,)
    n_samples : int
        :math:`S`.
    n_classes : int, optional
        The number of classes; by default one more than the largest label.

    Returns
    -------
    labels : numpy.ndarray, shape (S,)
    n_classes : int

    Raises
    ------
    ValueError
        For a wrong shape, a negative label, or a label of ``n_classes`` or more.
    TypeError
        For labels that are not integers.

    Examples
    --------
    >>> import numpy as np
    >>> check_labels(np.array([0, 2, 1]), 3, None)
    (array([0, 2, 1]), 3)
    """
    array = host_array(labels)
    if array.shape != (n_samples,):
        raise ValueError(
            f"labels must have shape ({n_samples},) (one per sample), got {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"labels must be integers (class indices), got {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {array.min()}")
    seen = int(array.max()) + 1 if array.size else 0
    if n_classes is None:
        n_classes = seen
    elif seen > n_classes:
        raise ValueError(f"labels hold class {seen - 1} but n_classes is {n_classes}")
    return array, n_classes
