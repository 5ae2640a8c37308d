"""Type aliases of mumoe's public signatures."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

__all__ = ["PathLike", "Rank", "RankLike", "RankOrBudget", "Shape", "Tensor"]

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
