"""Type aliases of mumoe's public signatures, and :class:`SparseGate`, a gate by its support."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = ["PathLike", "Rank", "RankLike", "RankOrBudget", "Shape", "SparseGate", "Tensor"]

#: An array of the active TensorLy backend (``numpy.ndarray``, ``torch.Tensor``,
#: ``cupy.ndarray``, ...).  TensorLy has no common base class, hence ``Any``.
Tensor: TypeAlias = Any

#: A tensor shape.
Shape: TypeAlias = tuple[int, ...]

#: The bond sizes of a spec: one int for every bond, or one per bond name.
RankLike: TypeAlias = int | Mapping[str, int]

#: The rank of a preset: one int, or one int per bond (Tucker: per mode).
Rank: TypeAlias = int | Sequence[int]

#: The ``rank`` of a layer: a preset's rank, a spec's bond sizes, or a parameter
#: budget (``"same"``: as many parameters as ``nn.Linear``; a ``mumoe.Budget``:
#: a fraction of them or a count).
RankOrBudget: TypeAlias = Rank | Mapping[str, int] | str | Any

#: A file path.
PathLike: TypeAlias = str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class SparseGate:
    r"""One level's gate coefficients given by each row's support: indices and values.

    Stands for the dense coefficients ``a`` of shape ``(..., N)`` with
    ``a[..., indices[..., j]] = values[..., j]`` and zeros elsewhere: what a
    top-k gate (or an entmax-1.5 or sparsemax gate of small support) hands
    the contraction instead of a mostly-zero ``(..., N)`` matrix, so that the
    step that consumes the expert leg gathers ``k`` rows of its core instead
    of multiplying ``N`` (:func:`mumoe.functional.forward`).  Every row has
    the same number ``k`` of entries; a row whose support is smaller carries
    entries whose value is 0.  An index repeated in a row counts with the sum
    of its values (the gates' supports never repeat one).

    Made by the gate step (:func:`mumoe.gates.gate_coefficients` with
    ``max_density``, :func:`mumoe.gates.sparsify`) or by hand; checked where
    it is used.

    Parameters
    ----------
    indices : integer tensor, shape (..., k)
        The experts of each row's support, in ``[0, n_experts)``.
    values : tensor, shape (..., k)
        Their coefficients (differentiable where the backend is).
    n_experts : int
        :math:`N_e`, the size of the level: the last dimension of the dense
        coefficients.

    Examples
    --------
    >>> import numpy as np
    >>> gate = SparseGate(np.array([[2, 0]]), np.array([[0.75, 0.25]]), 4)
    >>> gate.k, gate.n_experts, gate.density
    (2, 4, 0.5)
    """

    indices: Tensor
    values: Tensor
    n_experts: int

    @property
    def k(self) -> int:
        """Entries per row (the last dimension of ``indices`` and ``values``).

        Examples
        --------
        >>> import numpy as np
        >>> SparseGate(np.zeros((3, 5), int), np.zeros((3, 5)), 64).k
        5
        """
        return int(self.indices.shape[-1])

    @property
    def density(self) -> float:
        """``k / n_experts``: the share of the level each row pays for.

        Examples
        --------
        >>> import numpy as np
        >>> SparseGate(np.zeros((3, 16), int), np.zeros((3, 16)), 64).density
        0.25
        """
        return self.k / self.n_experts

    def __repr__(self) -> str:
        shape = tuple(self.indices.shape)
        return f"SparseGate(shape={shape}, n_experts={self.n_experts})"
