"""How the planning layer names sizes in its messages: bytes, dtypes, a network in short."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from mumoe.spec import Network

__all__ = ["bytes_text", "dtype_text", "itemsize", "short_name"]


def short_name(network: Network) -> str:
    """The network in a few words (its repr holds every leg: too long for a message)."""
    bonds = len(network.ranks)
    return (
        f"the {network.format} network ({network.n_cores} cores, {bonds} bond"
        f"{'s' if bonds != 1 else ''}, {network.n_experts:,} experts, "
        f"{network.in_features} -> {network.out_features})"
    )


def itemsize(dtype: Hashable) -> int:
    """Bytes an entry: NumPy, CuPy and JAX dtypes and torch.dtype say; 8 where unknown."""
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    try:
        return int(np.dtype(dtype).itemsize)  # type: ignore[call-overload]
    except TypeError:
        return 8


def dtype_text(dtype: Hashable) -> str:
    """``"in float32"``, or how entries are counted where the dtype is not known."""
    return "at 8 bytes an entry" if dtype is None else f"in {str(dtype).removeprefix('torch.')}"


def bytes_text(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps a leading digit."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"
