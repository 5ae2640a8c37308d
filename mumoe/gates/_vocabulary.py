r"""Gating on any backend: the one vocabulary of gate activations and normalisations.

For each expert level :math:`e` (Section 3 of the paper),

.. math::
    a^{(e)} = \phi\bigl(\mathrm{norm}(x G_e)\bigr), \qquad
    G_e \in \mathbb{R}^{I \times N_e} \text{ zero-initialised},

computed by :func:`gate_coefficients`, the gate step of the layer recipe
(:mod:`mumoe.functional`).  ``norm`` is one of :data:`NORMALIZATIONS` (batch
normalisation without affine parameters, layer normalisation without affine
parameters, or nothing) and :math:`\phi` one of :data:`ACTIVATIONS` or any
callable.  Those names are the whole vocabulary: every layer accepts them,
and every backend has a kernel for each.

Gating computes in float32 at least: 16-bit inputs are widened for the
logits, their normalisation and the activation, and the coefficients cast
back (:func:`gate_dtype`).  In float16, logits of a few tens of thousands
overflow entmax-1.5's squares.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorly as tl

from mumoe.backends import backend_erf, cast
from mumoe.gates._activations import (
    _keep,
    check_top_k,
    entmax15,
    relu_topk,
    softmax,
    sparsemax,
    topk,
)
from mumoe.gates._sparse import sparsify
from mumoe.typing import SparseGate, Tensor
from mumoe.validation import dtype_name

__all__ = [
    "ACTIVATIONS",
    "HIDDEN_ACTIVATIONS",
    "NORMALIZATIONS",
    "activation_name",
    "batch_norm",
    "check_hidden_activation",
    "check_normalization",
    "gate_coefficients",
    "gate_dtype",
    "gelu",
    "gelu_tanh",
    "layer_norm",
    "relu",
    "resolve_activation",
    "silu",
]

Activation = Callable[[Tensor], Tensor]


#: The gate activations by name, with their kernels on any TensorLy backend; each
#: maps logits ``(..., N)`` to non-negative coefficients, on the simplex for all
#: but ``"relu_topk"`` (MxD's unnormalised gate).  The vocabulary of every layer:
#: :mod:`mumoe.nn` gives the same names torch kernels.  ``"topk"`` and
#: ``"relu_topk"`` also take ``k``, the layer's ``top_k`` (:func:`resolve_activation`).
ACTIVATIONS: dict[str, Callable[..., Tensor]] = {
    "entmax15": entmax15,
    "sparsemax": sparsemax,
    "softmax": softmax,
    "topk": topk,
    "relu_topk": relu_topk,
}

#: The normalisations of the gate logits: batch norm and layer norm without
#: affine parameters, or none.
NORMALIZATIONS: tuple[str | None, ...] = ("bn", "ln", None)


def resolve_activation(
    activation: str | Activation,
    kernels: Mapping[str, Callable[..., Tensor]] | None = None,
    *,
    top_k: int | None = None,
) -> Activation:
    """The kernel of the activation called ``activation``, or ``activation`` itself if callable.

    Parameters
    ----------
    activation : {"entmax15", "sparsemax", "softmax", "topk", "relu_topk"} or callable
    kernels : mapping, optional
        Kernels for the names of :data:`ACTIVATIONS` (the torch modules pass
        theirs); :data:`ACTIVATIONS` itself by default.
    top_k : int, optional
        With ``"topk"`` or ``"relu_topk"`` (and only then): the experts each
        row keeps (:func:`check_top_k`).

    Returns
    -------
    callable
        From logits ``(B, N)`` to coefficients ``(B, N)``.

    Raises
    ------
    ValueError
        For a name outside the vocabulary, or ``top_k`` missing for a top-k
        activation or given for anything else.

    Examples
    --------
    >>> import numpy as np
    >>> resolve_activation("sparsemax")(np.array([[3.0, 1.0, 0.0]]))
    array([[1., 0., 0.]])
    >>> resolve_activation("topk", top_k=1)(np.array([[3.0, 1.0, 0.0]]))
    array([[1., 0., 0.]])
    """
    k = check_top_k(activation, top_k)
    if callable(activation):
        return activation
    if isinstance(activation, str) and activation in ACTIVATIONS:
        kernel = (ACTIVATIONS if kernels is None else kernels)[activation]
        return kernel if k is None else functools.partial(kernel, k=k)
    raise ValueError(
        f"unknown gate activation {activation!r}; choose one of "
        f"{', '.join(map(repr, ACTIVATIONS))} or pass a callable"
    )


def activation_name(activation: str | Activation) -> str:
    """The name a layer reports (and a weights file stores) for ``activation``.

    Parameters
    ----------
    activation : str or callable

    Returns
    -------
    str
        The name itself, or a callable's ``__name__`` (``"custom"`` without one).

    Examples
    --------
    >>> activation_name("softmax"), activation_name(lambda z: z)
    ('softmax', '<lambda>')
    """
    if isinstance(activation, str):
        return activation
    return str(getattr(activation, "__name__", "custom"))


def check_normalization(normalization: Any) -> str | None:
    """Return ``normalization`` if it is one of :data:`NORMALIZATIONS`, else raise.

    Parameters
    ----------
    normalization : {"bn", "ln", None}

    Returns
    -------
    str or None

    Raises
    ------
    ValueError
        For anything else.

    Examples
    --------
    >>> check_normalization("ln")
    'ln'
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown gate normalization {normalization!r}; choose 'bn', 'ln' or None")
    return normalization


#: Dtypes gating widens to float32 (by name, on every backend).
_NARROW = frozenset({"float16", "bfloat16"})


def gate_dtype(dtype: Any) -> Any:
    """The dtype gating computes in for inputs of ``dtype``: float32 at least.

    Parameters
    ----------
    dtype : dtype of any backend

    Returns
    -------
    dtype
        ``float32`` of the same library for 16-bit floats, ``dtype`` itself otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> gate_dtype(np.dtype("float16")), gate_dtype(np.dtype("float64"))
    (<class 'numpy.float32'>, dtype('float64'))
    """
    if dtype_name(dtype) not in _NARROW:
        return dtype
    # float32 of the dtype's own library (torch.float32 for torch.float16, ...).
    library = sys.modules.get(type(dtype).__module__.partition(".")[0])
    return getattr(library, "float32", np.float32)


def gelu(x: Tensor) -> Tensor:
    r"""GELU, exactly as ``torch.nn.GELU()``.

    :math:`x \Phi(x) = \tfrac{x}{2}(1 + \mathrm{erf}(x/\sqrt{2}))`.

    The error function is the active backend's, as declared in ``mumoe/backends/``
    (TensorLy has none).

    Parameters
    ----------
    x : tensor

    Returns
    -------
    tensor
        Of the shape and dtype of ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> gelu(np.array([0.0, 1.0]))  # doctest: +ELLIPSIS
    array([0.        , 0.841344...])
    """
    return x * (1 + backend_erf()(x * 0.7071067811865476)) / 2


def gelu_tanh(x: Tensor) -> Tensor:
    r"""GELU's tanh approximation, exactly as ``torch.nn.GELU(approximate="tanh")`` (GPT-2's).

    :math:`\tfrac{x}{2}\bigl(1 + \tanh(\sqrt{2/\pi}\,(x + 0.044715\,x^3))\bigr)`.

    Parameters
    ----------
    x : tensor

    Returns
    -------
    tensor
        Of the shape and dtype of ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> gelu_tanh(np.array([0.0, 1.0]))  # doctest: +ELLIPSIS
    array([0.        , 0.841191...])
    """
    return x * (1 + tl.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))) / 2


def relu(x: Tensor) -> Tensor:
    r"""ReLU, :math:`\max(x, 0)` (NaN stays NaN, as ``torch.relu``).

    Parameters
    ----------
    x : tensor

    Returns
    -------
    tensor

    Examples
    --------
    >>> import numpy as np
    >>> relu(np.array([-1.0, 2.0]))
    array([0., 2.])
    """
    return tl.clip(x, 0, None)


def silu(x: Tensor) -> Tensor:
    r"""SiLU (swish), :math:`x\,\sigma(x)`, as ``torch.nn.SiLU`` (Llama's MLP).

    The sigmoid is :math:`(1 + \tanh(x/2))/2`, which overflows nowhere.

    Parameters
    ----------
    x : tensor

    Returns
    -------
    tensor

    Examples
    --------
    >>> import numpy as np
    >>> silu(np.array([0.0, 1.0, -1000.0]))  # doctest: +ELLIPSIS
    array([ 0.        ,  0.731058..., -0.        ])
    """
    return x * (1 + tl.tanh(x / 2)) / 2


#: The hidden activations of MLP blocks by name, on any TensorLy backend
#: (:class:`mumoe.nn.MuMoEBlock` gives the same names torch modules).
HIDDEN_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": relu,
    "silu": silu,
}


def check_hidden_activation(name: Any) -> str:
    """Return ``name`` if it is one of :data:`HIDDEN_ACTIVATIONS`, else raise.

    Parameters
    ----------
    name : str

    Returns
    -------
    str

    Raises
    ------
    ValueError
        For anything else, listing the names.

    Examples
    --------
    >>> check_hidden_activation("silu")
    'silu'
    """
    if not isinstance(name, str) or name not in HIDDEN_ACTIVATIONS:
        raise ValueError(
            f"unknown hidden activation {name!r}; choose one of "
            f"{', '.join(map(repr, HIDDEN_ACTIVATIONS))} (glu=True makes any of them gated: "
            "'silu' is SwiGLU, 'gelu' GeGLU)"
        )
    return name


def batch_norm(logits: Tensor, mean: Tensor, var: Tensor, eps: float = 1e-5) -> Tensor:
    """Batch normalisation without affine parameters, from running statistics (eval mode).

    Parameters
    ----------
    logits : tensor, shape (B, N)
    mean, var : tensor, shape (N,)
        The running mean and (unbiased) variance, as ``torch.nn.BatchNorm1d``
        keeps them.
    eps : float, default 1e-5

    Returns
    -------
    tensor, shape (B, N)
        ``(logits - mean) / sqrt(var + eps)``.

    Examples
    --------
    >>> import numpy as np
    >>> batch_norm(np.array([[1.0, 4.0]]), np.array([1.0, 2.0]), np.array([1.0, 4.0]), eps=0.0)
    array([[0., 1.]])
    """
    return (logits - mean) / tl.sqrt(var + eps)


def layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Layer normalisation over the last axis (biased variance, as ``torch.nn.LayerNorm``).

    Parameters
    ----------
    x : tensor, shape (..., D)
    weight, bias : tensor, shape (D,), optional
        The affine parameters; none by default.
    eps : float, default 1e-5

    Returns
    -------
    tensor, shape (..., D)

    Examples
    --------
    >>> import numpy as np
    >>> layer_norm(np.array([[1.0, 3.0]]), eps=0.0)
    array([[-1.,  1.]])
    """
    mean = _keep(tl.mean(x, axis=-1), x)
    centred = x - mean
    var = _keep(tl.mean(centred * centred, axis=-1), x)
    out = centred / tl.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def gate_coefficients(
    x: Tensor,
    projections: Sequence[Tensor],
    norms: Sequence[Callable[[Tensor], Tensor] | None],
    activation: Callable[[Tensor], Tensor],
    logits: list[Tensor] | None = None,
    biases: Sequence[Tensor] | None = None,
    *,
    max_density: float | None = None,
    support: Callable[..., Any] | None = None,
) -> list[Any]:
    """The gate coefficients ``activation(norm(x @ G_e + b_e))`` of every level.

    The gate step of the layer recipe, on any backend (torch modules are
    valid ``norms``).  Computes in :func:`gate_dtype` of the input's dtype
    and returns the input's dtype.

    Parameters
    ----------
    x : tensor, shape (..., I)
    projections : sequence of tensors, each (I, N_e)
        The gate projections :math:`G_e`.
    norms : sequence of callables or None
        Applied to the logits flattened to ``(B, N_e)``, so that batch norm
        takes its statistics over every leading dimension (None: no norm).
    activation : callable
        From logits ``(B, N_e)`` to coefficients, such as :func:`entmax15`.
    logits : list, optional
        If given, each level's activation input ``norm(x @ G_e + b_e)``,
        shaped ``(..., N_e)``, is appended to it (for the router z-loss,
        :func:`mumoe.gates.router_z_loss`).
    biases : sequence of tensors, each (N_e,), optional
        The gate biases :math:`b_e` (MxD's gate has one); none by default.
    max_density : float, optional
        Give a level as its support, a :class:`~mumoe.typing.SparseGate`,
        where that support is at most this share of ``N_e``
        (:func:`mumoe.gates.sparsify`); None (default): dense coefficients.
    support : callable, optional
        With ``max_density``: ``support(logits, max_density=...)``, the
        activation computed as a support directly
        (:data:`mumoe.gates.SPARSE_ACTIVATIONS`); by default the activation's
        dense coefficients are sparsified.

    Returns
    -------
    list of tensors, each (..., N_e), or SparseGate
        A :class:`~mumoe.typing.SparseGate` (indices and values of shape
        ``(..., k)``) where ``max_density`` asks for one and the support fits.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((2, 3, 4))
    >>> [a.shape for a in gate_coefficients(x, [np.zeros((4, 5))], [None], softmax)]
    [(2, 3, 5)]
    >>> bias = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    >>> gate_coefficients(x, [np.zeros((4, 5))], [None], softmax, biases=[bias])[0][0, 0].round(3)
    array([0.149, 0.149, 0.149, 0.149, 0.405])
    """
    lead = tuple(x.shape[:-1])
    rows = x.reshape(-1, x.shape[-1])
    compute = gate_dtype(x.dtype)
    if compute != x.dtype:
        rows = cast(rows, compute)
    gates = []
    for e, (projection, norm) in enumerate(zip(projections, norms, strict=True)):
        z = rows @ (projection if projection.dtype == compute else cast(projection, compute))
        if biases is not None:
            bias = biases[e]
            z = z + (bias if bias.dtype == compute else cast(bias, compute))
        if norm is not None:
            z = norm(z)
        if logits is not None:
            logits.append(z.reshape(*lead, projection.shape[-1]))
        if max_density is None or max_density <= 0:
            coefficients = activation(z)
        elif support is not None:
            coefficients = support(z, max_density=max_density)
        else:
            coefficients = sparsify(activation(z), max_density)
        if isinstance(coefficients, SparseGate):
            values = coefficients.values
            if values.dtype != x.dtype:
                values = cast(values, x.dtype)
            shape = (*lead, coefficients.k)
            coefficients = SparseGate(
                coefficients.indices.reshape(shape), values.reshape(shape), coefficients.n_experts
            )
        else:
            if coefficients.dtype != x.dtype:
                coefficients = cast(coefficients, x.dtype)
            coefficients = coefficients.reshape(*lead, projection.shape[-1])
        gates.append(coefficients)
    return gates
