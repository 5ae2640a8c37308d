r"""Initialisation of the cores of a μMoE layer (in place, on torch tensors).

The paper's schemes (the reference implementation's) make the layer start
close to a linear layer whose experts differ only by scale:

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
    have variance :math:`1/(3I)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mumoe.network import Network
from mumoe.presets import preset_format

__all__ = ["init_cores_"]


def _uniform_(tensor: torch.Tensor, fan_in: int) -> None:
    bound = math.sqrt(1.0 / fan_in)
    tensor.uniform_(-bound, bound)


def _expert_factor_(tensor: torch.Tensor, level: int) -> None:
    # CP and Tucker expert factors: N(1, 1) for the first level, ones after.
    if level == 0:
        tensor.normal_(1.0, 1.0)
    else:
        tensor.fill_(1.0)


def _diagonal_expert_core_(core: torch.Tensor, level: int) -> None:
    # core: (R_left, N, R_right); each slice diagonal with N(1, var) entries.
    left, n, right = core.shape
    var = 1.0 if level == 0 else 0.0
    core.zero_()
    diagonal = torch.eye(left, right, device=core.device, dtype=core.dtype)
    for k in range(n):
        noise = torch.randn(left, right, device=core.device, dtype=core.dtype)
        core[:, k, :] = diagonal * (noise * math.sqrt(var) + 1.0)


def _init_cp(network: Network, cores: Sequence[torch.Tensor]) -> None:
    for level in range(network.n_levels):
        _expert_factor_(cores[level], level)
    _uniform_(cores[-2], network.in_features)
    _uniform_(cores[-1], network.ranks["r"])


def _init_ring(network: Network, cores: Sequence[torch.Tensor], ring: bool) -> None:
    # TR cores are (R_k, D_k, R_k+1); TT boundary cores lack their size-1 bond.
    shaped = list(cores)
    if not ring:
        shaped[0] = cores[0].unsqueeze(0)
        shaped[-1] = cores[-1].unsqueeze(-1)
    for level in range(network.n_levels):
        _diagonal_expert_core_(shaped[level], level)
    _uniform_(shaped[-2], network.in_features)
    out = shaped[-1]
    _uniform_(out, out.shape[0] * out.shape[2])


def _init_tucker(network: Network, cores: Sequence[torch.Tensor]) -> None:
    levels = network.n_levels
    for level in range(levels):
        _expert_factor_(cores[level], level)
    _uniform_(cores[levels], network.in_features)
    _uniform_(cores[levels + 1], network.ranks["ro"])
    expert_mass = math.prod(
        (2 if level == 0 else 1) * network.ranks[f"r{level + 1}"] for level in range(levels)
    )
    bound = 3.0 / math.sqrt(network.ranks["ri"] * expert_mass)
    cores[-1].uniform_(-bound, bound)


def _init_dense(network: Network, cores: Sequence[torch.Tensor]) -> None:
    _uniform_(cores[0], network.in_features)


def _init_custom(network: Network, cores: Sequence[torch.Tensor]) -> None:
    variance = 1.0 / (3 * network.in_features)
    n_terms = math.prod(network.ranks.values())
    scale = (variance / n_terms) ** (1.0 / (2 * network.n_cores))
    for core in cores:
        core.normal_(0.0, scale)


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
        The scheme used: a preset name, or ``"custom"``.

    Examples
    --------
    >>> import torch
    >>> from mumoe import cp
    >>> net = cp(8, 16, 4, rank=3)
    >>> cores = [torch.empty(shape) for shape in net.core_shapes]
    >>> init_cores_(net, cores)
    'cp'
    >>> bool(cores[1].abs().max() <= 0.25)  # input factor: U(±sqrt(1/I))
    True
    """
    fmt = preset_format(network)
    with torch.no_grad():
        if fmt == "cp":
            _init_cp(network, cores)
        elif fmt == "tr":
            _init_ring(network, cores, ring=True)
        elif fmt == "tt":
            _init_ring(network, cores, ring=False)
        elif fmt == "tucker":
            _init_tucker(network, cores)
        elif fmt == "dense":
            _init_dense(network, cores)
        else:
            _init_custom(network, cores)
    return fmt or "custom"
