r"""Gating: the expert coefficients of each level, computed from the input.

For each expert level :math:`e` (Section 3 of the paper),

.. math::
    a^{(e)} = \phi\bigl(\mathrm{norm}(x G_e)\bigr), \qquad
    G_e \in \mathbb{R}^{I \times N_e} \text{ zero-initialised},

where ``norm`` is batch normalisation without affine parameters (statistics
over the batch and token dimensions), layer normalisation without affine
parameters, or nothing, and :math:`\phi` is entmax-1.5 (the default),
sparsemax, softmax or any callable mapping ``(..., N_e)`` to ``(..., N_e)``.

Gating runs in float32 at least, whatever the input's dtype and whether
``torch.autocast`` is on: the logits, their normalisation (whose running
statistics are kept in float32) and the activation.  The coefficients are
then cast to the input's dtype.  In float16, logits of a few tens of
thousands overflow entmax-1.5's squares and the ``entmax`` package returns
NaNs or fails (deep-spin/entmax#30); half-precision running variances lose
the precision batch norm needs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "NORMALIZATIONS",
    "MuMoEGate",
    "gate_coefficients",
    "gate_dtype",
    "resolve_activation",
]

Activation = Callable[[torch.Tensor], torch.Tensor]


#: entmax's partial sort: the threshold is found among the ``k`` largest logits,
#: ``k`` doubling for the rows whose support is not inside them, so the result
#: is exact.  Gate supports are small (tens of experts), and a top-32 costs a
#: sixth of the full sort at N = 2048 (``benchmarks/README.md``).
PARTIAL_SORT = 32


def _partial_sort(n: int) -> int | None:
    return PARTIAL_SORT if n > PARTIAL_SORT else None


def _nan_safe(activation: Activation) -> Activation:
    """``activation``, with NaN coefficients for rows whose logits are not all finite.

    The ``entmax`` package fails on such rows (an index error inside its
    threshold search) instead of returning NaNs as softmax does; rows are
    independent, so the finite ones are computed as usual.  The check runs
    only when the activation fails: nothing is added to the common path.
    """

    def safe(logits: torch.Tensor) -> torch.Tensor:
        try:
            return activation(logits)
        except (RuntimeError, IndexError):
            finite = torch.isfinite(logits).all(dim=-1)
            if bool(finite.all()):
                raise
        out = torch.full_like(logits, math.nan)
        if bool(finite.any()):
            out[finite] = activation(logits[finite])
        return out

    safe.__name__ = activation.__name__
    return safe


@_nan_safe
def _entmax15(logits: torch.Tensor) -> torch.Tensor:
    from entmax import entmax15

    return entmax15(logits, dim=-1, k=_partial_sort(logits.shape[-1]))


@_nan_safe
def _sparsemax(logits: torch.Tensor) -> torch.Tensor:
    from entmax import sparsemax

    return sparsemax(logits, dim=-1, k=_partial_sort(logits.shape[-1]))


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


#: Activations by name; each maps logits ``(..., N)`` to coefficients on the simplex.
ACTIVATIONS: dict[str, Activation] = {
    "entmax15": _entmax15,
    "sparsemax": _sparsemax,
    "softmax": _softmax,
}

#: Normalisations of the gate logits by name (``None``: none).
NORMALIZATIONS = ("bn", "ln", None)


def resolve_activation(activation: str | Activation) -> Activation:
    """The activation called ``activation``, or ``activation`` itself if callable.

    Parameters
    ----------
    activation : {"entmax15", "sparsemax", "softmax"} or callable

    Returns
    -------
    callable
        From logits ``(B, N)`` to coefficients ``(B, N)``.

    Raises
    ------
    ValueError
        For an unknown name.

    Examples
    --------
    >>> import torch
    >>> resolve_activation("sparsemax")(torch.tensor([[3.0, 1.0, 0.0]]))
    tensor([[1., 0., 0.]])
    """
    if callable(activation):
        return activation
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown gate activation {activation!r}; choose one of "
            f"{', '.join(map(repr, ACTIVATIONS))} or pass a callable"
        ) from None


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gating computes in for inputs of ``dtype``: float32 at least.

    Parameters
    ----------
    dtype : torch.dtype

    Returns
    -------
    torch.dtype
        ``float32`` for 16-bit floats, ``dtype`` itself otherwise.

    Examples
    --------
    >>> import torch
    >>> gate_dtype(torch.bfloat16), gate_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return _GATE_DTYPES.get(dtype, dtype)


_GATE_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _norm(kind: str | None, n: int, device: object, dtype: torch.dtype | None) -> nn.Module:
    dtype = gate_dtype(dtype or torch.get_default_dtype())
    if kind == "bn":
        return nn.BatchNorm1d(n, affine=False, device=device, dtype=dtype)
    if kind == "ln":
        return nn.LayerNorm(n, elementwise_affine=False, bias=False, device=device, dtype=dtype)
    if kind is None:
        return nn.Identity()
    raise ValueError(f"unknown gate normalization {kind!r}; choose 'bn', 'ln' or None")


def gate_coefficients(
    x: torch.Tensor,
    projections: Sequence[torch.Tensor],
    norms: Sequence[nn.Module],
    activation: Activation,
) -> list[torch.Tensor]:
    """The coefficients ``act(norm(x @ G_e))`` of every level.

    Parameters
    ----------
    x : torch.Tensor, shape (..., I)
    projections : sequence of torch.Tensor, each (I, N_e)
    norms : sequence of modules
        Applied to the logits flattened to ``(B, N_e)``, so that batch norm
        takes its statistics over every leading dimension (batch and tokens).
    activation : callable

    Returns
    -------
    list of torch.Tensor, each (..., N_e)

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> gates = gate_coefficients(torch.randn(2, 3, 8), [torch.zeros(8, 4)], [nn.Identity()],
    ...                           resolve_activation("softmax"))
    >>> gates[0].shape, gates[0][0, 0]
    (torch.Size([2, 3, 4]), tensor([0.2500, 0.2500, 0.2500, 0.2500]))
    """
    compute = gate_dtype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    if compute != x.dtype:
        rows = rows.to(compute)
    autocast = torch.is_autocast_enabled(x.device.type)
    gates = []
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        for projection, norm in zip(projections, norms, strict=True):
            logits = norm(
                rows @ (projection if projection.dtype == compute else projection.to(compute))
            )
            coefficients = activation(logits)
            if coefficients.dtype != x.dtype:
                coefficients = coefficients.to(x.dtype)
            gates.append(coefficients.reshape(*x.shape[:-1], projection.shape[-1]))
    return gates


class MuMoEGate(nn.Module):
    r"""The gates of a μMoE layer: one coefficient vector per expert level.

    Parameters
    ----------
    in_features : int
        :math:`I`, the size of the input the gates are computed from.
    expert_dims : sequence of int
        :math:`N_1, \dots, N_E`.
    normalization : {"bn", "ln", None}, default "bn"
        Of the logits: batch norm or layer norm without affine parameters.
    activation : {"entmax15", "sparsemax", "softmax"} or callable, default "entmax15"
    device, dtype
        Of the parameters, as for ``torch.nn.Linear``.

    Notes
    -----
    Maps an input ``(..., I)`` to ``[(..., N_1), ..., (..., N_E)]``.

    Examples
    --------
    >>> import torch
    >>> gate = MuMoEGate(8, (4, 3))
    >>> [tuple(a.shape) for a in gate(torch.randn(5, 2, 8))]
    [(5, 2, 4), (5, 2, 3)]
    """

    def __init__(
        self,
        in_features: int,
        expert_dims: Sequence[int],
        *,
        normalization: str | None = "bn",
        activation: str | Activation = "entmax15",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.expert_dims = tuple(expert_dims)
        self.normalization = normalization
        self.activation = resolve_activation(activation)
        self.activation_name = (
            activation if isinstance(activation, str) else getattr(activation, "__name__", "custom")
        )
        self.projections = nn.ParameterList(
            [
                nn.Parameter(torch.empty(in_features, n, device=device, dtype=dtype))
                for n in self.expert_dims
            ]
        )
        self.norms = nn.ModuleList(
            [_norm(normalization, n, device, dtype) for n in self.expert_dims]
        )
        self.reset_parameters()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .half(), .to(torch.bfloat16), ...: the projections follow, the norms'
        # running statistics stay in float32 (see the module docstring).
        super()._apply(fn, recurse)
        for norm in self.norms:
            for name, buffer in list(norm.named_buffers(recurse=False)):
                wanted = gate_dtype(buffer.dtype)
                if buffer.is_floating_point() and buffer.dtype != wanted:
                    setattr(norm, name, buffer.to(wanted))
        return self

    def reset_parameters(self) -> None:
        """Zero the projections (every expert starts equally weighted) and reset norms.

        Examples
        --------
        >>> import torch
        >>> gate = MuMoEGate(4, (3,))
        >>> gate.reset_parameters()
        >>> gate(torch.randn(5, 4))[0][0]  # equal logits: equal coefficients
        tensor([0.3333, 0.3333, 0.3333], grad_fn=<SelectBackward0>)
        """
        for projection in self.projections:
            nn.init.zeros_(projection)
        for norm in self.norms:
            if isinstance(norm, nn.BatchNorm1d):
                norm.reset_running_stats()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The gate coefficients of every level.

        Parameters
        ----------
        x : torch.Tensor, shape (..., I)

        Returns
        -------
        list of torch.Tensor, each (..., N_e)

        Examples
        --------
        >>> import torch
        >>> [tuple(a.shape) for a in MuMoEGate(4, (3, 2))(torch.randn(5, 4))]
        [(5, 3), (5, 2)]
        """
        return gate_coefficients(x, list(self.projections), list(self.norms), self.activation)

    def extra_repr(self) -> str:
        """Sizes and options, for ``repr``."""
        return (
            f"in_features={self.in_features}, expert_dims={self.expert_dims}, "
            f"normalization={self.normalization!r}, activation={self.activation_name!r}"
        )
