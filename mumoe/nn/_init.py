r"""Initialisation of the cores of a μMoE layer (in place, on torch tensors).

Each format's scheme is data in its record (:data:`mumoe.spec.FORMATS`,
``init``): one distribution per core, applied here in core order.  The
paper's schemes (the reference implementation's) start every expert from
the same rank-one terms, weighted per expert by factors random around 1:
related matrices, not rescalings of one (mean :math:`|\cos|` between two
experts about 0.5 for CP and TR, 0.6 for Tucker; only TT's experts start as exact
multiples of one matrix, see :doc:`/theory/tt`):

``cp``
    first expert level :math:`U_1 \sim \mathcal{N}(1, 1)`, further levels
    ones; input factor :math:`\mathcal{U}(\pm\sqrt{1/I})`; output factor
    :math:`\mathcal{U}(\pm\sqrt{1/R})`.
``tr``
    every slice :math:`\mathcal{G}_e[:, n, :]` of an expert core is diagonal
    with :math:`\mathcal{N}(1, v)` entries, :math:`v = 1` for the first level
    and :math:`0` for further ones; input core :math:`\mathcal{U}(\pm\sqrt{1/I})`;
    output core :math:`\mathcal{U}(\pm\sqrt{1/(R_{E+1} R_0)})`.

Analogues for the other formats:

``tt``
    the TR scheme with boundary ranks :math:`R_0 = R_d = 1`.
``tucker``
    expert factors and input/output factors as for CP (the output fan-in
    being :math:`R_O`), and the core :math:`\mathcal{U}(\pm c)` with
    :math:`c = 3 / \sqrt{R_I \prod_e m_e R_e}`, :math:`m_1 = 2` and
    :math:`m_{e>1} = 1` (the mean squares of the expert factors): each
    expert's matrix then has entries of variance :math:`1/(3I)`, that of an
    ``nn.Linear`` weight.
``dense``
    every expert's slice as ``nn.Linear``: :math:`\mathcal{U}(\pm\sqrt{1/I})`.
custom networks
    every core :math:`\mathcal{N}(0, \sigma^2)` with :math:`\sigma` chosen as
    in :func:`mumoe.random_cores` so that the entries of :math:`\mathcal{W}`
    have variance :math:`1/(3I)` (:func:`mumoe.spec.custom_init`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mumoe.spec import (
    FORMATS,
    Constant,
    CoreInit,
    DiagonalSlices,
    Network,
    Normal,
    Uniform,
    custom_init,
)

__all__ = ["apply_init_", "init_cores_"]


def _diagonal_slices_(core: torch.Tensor, init: DiagonalSlices) -> None:
    # The core as (left, N, right) around its expert leg; each slice diagonal, N(1, std^2).
    n = core.shape[init.axis]
    left, right = math.prod(core.shape[: init.axis]), math.prod(core.shape[init.axis + 1 :])
    view = core.view(left, n, right)
    view.zero_()
    diagonal = torch.eye(left, right, device=core.device, dtype=core.dtype)
    for k in range(n):
        noise = torch.randn(left, right, device=core.device, dtype=core.dtype)
        view[:, k, :] = diagonal * (noise * init.std + 1.0)


def apply_init_(tensor: torch.Tensor, init: CoreInit) -> None:
    """Fill ``tensor`` in place from the distribution ``init``.

    Parameters
    ----------
    tensor : torch.Tensor
        Written under ``torch.no_grad()`` by the caller.
    init : Normal, Uniform, Constant or DiagonalSlices

    Raises
    ------
    TypeError
        For another kind of ``init``.

    Examples
    --------
    >>> import torch
    >>> from mumoe.spec import Constant
    >>> t = torch.empty(2)
    >>> apply_init_(t, Constant(3.0))
    >>> t
    tensor([3., 3.])
    """
    if isinstance(init, Normal):
        tensor.normal_(init.mean, init.std)
    elif isinstance(init, Uniform):
        tensor.uniform_(-init.bound, init.bound)
    elif isinstance(init, Constant):
        tensor.fill_(init.value)
    elif isinstance(init, DiagonalSlices):
        _diagonal_slices_(tensor, init)
    else:
        raise TypeError(f"unknown core initialisation {init!r}")


def init_cores_(network: Network, cores: Sequence[torch.Tensor]) -> str:
    """Initialise ``cores`` in place with the scheme of ``network``'s format.

    Parameters
    ----------
    network : Network
    cores : sequence of torch.Tensor
        Of shapes ``network.core_shapes``; written under ``torch.no_grad()``.

    Returns
    -------
    str
        The scheme used: the format's name, or ``"custom"`` (also for a
        network that splits its input or output: :func:`mumoe.spec.custom_init`).

    Examples
    --------
    >>> import torch
    >>> from mumoe import cp
    >>> net = cp(16, 4, expert_dims=8, rank=3)
    >>> cores = [torch.empty(shape) for shape in net.core_shapes]
    >>> init_cores_(net, cores)
    'cp'
    >>> bool(cores[1].abs().max() <= 0.25)  # input factor: U(±sqrt(1/I))
    True
    """
    record = FORMATS.get(network.format)
    scheme = custom_init if record is None or network.splits else record.init
    inits = scheme(network.core_legs, network.sizes, network.in_features)
    with torch.no_grad():
        for core, init in zip(cores, inits, strict=True):
            apply_init_(core, init)
    return "custom" if network.splits else network.format
