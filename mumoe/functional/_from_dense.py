r"""Starting a network from a dense layer: every expert the layer, or its best approximation.

A μMoE layer that replaces a trained linear layer :math:`y = x W^\top + b`
should start where the linear layer was.  Since each level's gate
coefficients sum to one, a layer whose experts are all equal to
:math:`M = [W^\top; b]` (of shape :math:`I' \times O`) computes
:math:`z M`, the linear layer, whatever the gates.  :func:`cores_from_dense`
sets the cores of a network of any preset format so that every expert is
:math:`M` exactly (dense, MxD, and the ranked formats at rank
:math:`\ge \min(I', O)`), or its best rank-:math:`k` approximation
:math:`M_k = U_k S_k V_k^\top` (truncated SVD, Eckart–Young) where the
format's input-output bond :math:`k` is smaller:

=========  ===============================================================
format     cores (the parts not named keep their default initialisation)
=========  ===============================================================
dense      every slice :math:`\mathcal{W}[n] = M`
mxd        :math:`C_e = 1`, :math:`D = M`
cp         experts :math:`1`; input :math:`U_k S_k^{1/2}`, output
           :math:`V_k S_k^{1/2}` in the first :math:`k` columns, output 0
           beyond
tucker     experts' first column :math:`1`; input :math:`U_k`, output
           :math:`V_k`; core :math:`S_k` on the diagonal of its
           :math:`[0, \dots, 0]` slice, 0 elsewhere
tt, tr     every expert core's first row a unit vector, so that the chain
           of experts is :math:`e_0` (TT) or has first row
           :math:`e_0^\top` (TR); the input core's slice 0 holds
           :math:`U_k S_k^{1/2}`, the output core :math:`V_k S_k^{1/2}`,
           0 where the ring closes on another index (TR)
lowrank    every expert :math:`U_k S_k^{1/2} (V_k S_k^{1/2})^\top`
=========  ===============================================================

A network that splits its input or output (or a TT-matrix, which has no rule
of its own here) starts from the fit of its format
(:data:`~mumoe.functional.FITS`) to one expert, :math:`M` in the network's
legs, whose expert slices are then repeated for every expert; the
components the fit leaves unused take their initial values in one core
(:func:`~mumoe.functional.revive_bonds`).

Where a part of a core is set to zero, the part it multiplies keeps its
random initialisation: the product is exactly zero, yet both receive
gradients, so training is not stuck at this start (a zero against a zero
would be a saddle that gradients never leave).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mumoe.backends import thread_backend
from mumoe.functional._forward import expert_weight
from mumoe.functional._from_layers import ALS_FITS, FITS, revive_bonds
from mumoe.functional._legs import tensor_form
from mumoe.spec import Network

__all__ = ["STARTS", "cores_from_dense", "dense_matrix", "relative_error"]

Cores = list[np.ndarray]


def dense_matrix(weight: Any, bias: Any = None) -> np.ndarray:
    r""":math:`M = [W^\top; b]`, shape ``(I', O)``, of a linear layer's weight and bias.

    Parameters
    ----------
    weight : array, shape (O, I)
        As ``torch.nn.Linear.weight``.
    bias : array, shape (O,), optional

    Returns
    -------
    numpy.ndarray, shape (I + 1, O) with a bias, (I, O) without; float64

    Examples
    --------
    >>> dense_matrix(np.ones((3, 2)), np.zeros(3)).shape
    (3, 3)
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"a linear layer's weight has shape (O, I), got {w.shape}")
    if bias is None:
        return np.ascontiguousarray(w.T)
    b = np.asarray(bias, dtype=np.float64)
    if b.shape != (w.shape[0],):
        raise ValueError(
            f"bias of shape ({w.shape[0]},) expected for weight {w.shape}, got {b.shape}"
        )
    return np.concatenate([w.T, b[None, :]], axis=0)


def _svd(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The leading k singular triplets, by TensorLy's truncated SVD on NumPy.
    from tensorly.tenalg import svd_interface

    k = min(k, *matrix.shape)
    with thread_backend("numpy"):
        u, s, vt = svd_interface(matrix, method="truncated_svd", n_eigenvecs=k)
    return np.asarray(u), np.asarray(s), np.asarray(vt).T


def _halves(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    u, s, v = _svd(matrix, k)
    root = np.sqrt(s)
    return u * root, v * root, len(s)


def _dense(network: Network, m: np.ndarray, cores: Cores) -> Cores:
    (core,) = cores
    core[...] = m
    return cores


def _mxd(network: Network, m: np.ndarray, cores: Cores) -> Cores:
    for core in cores[:-1]:
        core[...] = 1.0
    cores[-1][...] = m
    return cores


def _rank_r_pair(u: np.ndarray, v: np.ndarray, m: np.ndarray, r: int) -> None:
    # Input and output factors along a last bond of size r (CP, and every expert of
    # lowrank): U_k S_k^1/2 and V_k S_k^1/2 first, then v zero against u's random columns.
    left, right, k = _halves(m, r)
    u[..., :k] = left
    v[..., :k] = right
    v[..., k:] = 0.0


def _cp(network: Network, m: np.ndarray, cores: Cores) -> Cores:
    *experts, u, v = cores
    for core in experts:
        core[...] = 1.0
    _rank_r_pair(u, v, m, network.ranks["r"])
    return cores


def _tucker(network: Network, m: np.ndarray, cores: Cores) -> Cores:
    *experts, u, v, core = cores
    for factor in experts:
        factor[:, 0] = 1.0
    left, s, right = _svd(m, min(network.ranks["ri"], network.ranks["ro"]))
    k = len(s)
    u[:, :k] = left
    v[:, :k] = right
    core[...] = 0.0  # against the experts' and factors' random columns
    diagonal = np.arange(k)
    index = (0,) * network.n_levels + (diagonal, diagonal)
    core[index] = s
    return cores


def _chain(network: Network, m: np.ndarray, cores: Cores) -> Cores:
    # TT and TR: every expert core's first row a unit vector; the input core's slice 0
    # and the output core hold the rank-k factors.
    levels = network.n_levels
    ring = network.format == "tr"
    for core in cores[:levels]:
        if core.ndim == 2:  # TT's first expert core (n1, r1): the chain starts at e_0
            core[...] = 0.0
            core[:, 0] = 1.0
        else:  # (r_prev, n, r_next): row 0 is e_0, the other rows keep their values
            core[0] = 0.0
            core[0, :, 0] = 1.0
    u, v = cores[levels], cores[levels + 1]
    left, right, k = _halves(m, u.shape[2])
    u[0, :, :k] = left
    if ring:  # v: (r, O, r0); the ring closes on index 0 only
        v[...] = 0.0
        v[:k, :, 0] = right.T
    else:  # v: (r, O)
        v[:k] = right.T
        v[k:] = 0.0
    return cores


def _lowrank(network: Network, m: np.ndarray, cores: Cores) -> Cores:
    u, v = cores
    _rank_r_pair(u, v, m, network.ranks["r"])
    return cores


#: The iterations of the alternating least squares that start a split CP or TR network
#: (a conversion, not a study: 100 takes seconds where 2,000 took a minute at 128 x 128).
START_ITERATIONS = 100


def _split_start(network: Network, m: np.ndarray, cores: Cores) -> Cores:
    # One expert fitted (its format's FITS rule, in the network's legs), its slices
    # repeated along every expert leg, the components the fit leaves unused revived.
    ones = (1,) * network.n_levels
    single = network.replace(expert_dims=ones[0] if network.n_levels == 1 else ones)
    target = tensor_form(single, m.reshape(*ones, *m.shape))
    options = {"n_iter_max": START_ITERATIONS} if network.format in ALS_FITS else {}
    with thread_backend("numpy"):
        fitted = FITS[network.format](single, target, 0, **options)
    experts = dict(zip(network.expert_legs, network.expert_dims, strict=True))
    for k, legs in enumerate(network.core_legs):
        for axis, leg in enumerate(legs):
            if leg in experts:
                fitted[k] = np.repeat(fitted[k], experts[leg], axis=axis)
    return revive_bonds(network, fitted, cores)


#: How each preset format starts from a dense matrix: ``start(network, M, cores)``
#: fills the float64 ``cores`` (default-initialised) in place and returns them.
STARTS: dict[str, Callable[[Network, np.ndarray, Cores], Cores]] = {
    "dense": _dense,
    "mxd": _mxd,
    "cp": _cp,
    "tucker": _tucker,
    "tt": _chain,
    "tr": _chain,
    "lowrank": _lowrank,
}


def cores_from_dense(network: Network, matrix: Any, cores: Sequence[Any]) -> Cores:
    r"""The cores of ``network`` with every expert ``matrix``, or its best rank-k approximation.

    Parameters
    ----------
    network : Network
        Of a preset format (:data:`STARTS`).
    matrix : array, shape (I', O)
        :math:`M = [W^\top; b]` (:func:`dense_matrix`), ``I'`` the network's
        input size (bias row included where the network has a bias).
    cores : sequence of arrays
        The network's cores at their default initialisation: the parts the
        start does not set keep these values.

    Returns
    -------
    list of numpy.ndarray
        New float64 cores.

    Raises
    ------
    ValueError
        If the network's format has no start (a custom spec), or shapes disagree.

    Examples
    --------
    >>> from mumoe import cp, expert_weight, random_cores
    >>> net = cp(3, 2, expert_dims=4, rank=2)
    >>> m = np.arange(8.0).reshape(4, 2)  # rank 2: exact
    >>> cores = cores_from_dense(net, m, random_cores(net, random_state=0))
    >>> w = expert_weight(net, cores, (3,))
    >>> bool(np.allclose(np.vstack([w.weight, w.bias]), m))
    True
    """
    start = None if network.splits else STARTS.get(network.format)
    if start is None and network.format in FITS:  # split legs, or a format fitted only (ttm)
        start = _split_start
    if start is None:
        raise ValueError(
            f"no rule starts a {network.format!r} network ({network.spec!r}) from a dense layer; "
            f"the formats with one are {', '.join(map(repr, FITS))}"
        )
    m = np.asarray(matrix, dtype=np.float64)
    expected = network.weight_shape[network.n_levels :]
    if m.shape != expected:
        raise ValueError(f"the dense matrix must have shape {expected} (I', O), got {m.shape}")
    copies = [np.array(core, dtype=np.float64, copy=True) for core in cores]
    if [c.shape for c in copies] != [tuple(s) for s in network.core_shapes]:
        raise ValueError(
            f"cores of shapes {list(network.core_shapes)} expected, got {[c.shape for c in copies]}"
        )
    return start(network, m, copies)


def relative_error(network: Network, cores: Sequence[Any], matrix: Any) -> float:
    """``||W_n - M||_F / ||M||_F`` for the first expert ``n = (0, ..., 0)``.

    After :func:`cores_from_dense` every expert is the same matrix, so this
    is the error of the layer against the dense one.

    Parameters
    ----------
    network : Network
    cores : sequence of arrays
    matrix : array, shape (I', O)

    Returns
    -------
    float

    Examples
    --------
    >>> from mumoe import mxd, random_cores
    >>> net = mxd(3, 2, expert_dims=4)
    >>> m = np.ones((4, 2))
    >>> relative_error(net, cores_from_dense(net, m, random_cores(net)), m)
    0.0
    """
    with thread_backend("numpy"):
        w = expert_weight(network, [np.asarray(c) for c in cores], (0,) * network.n_levels)
    first = np.asarray(w.weight) if w.bias is None else np.vstack([w.weight, w.bias])
    m = np.asarray(matrix, dtype=np.float64)
    norm = float(np.linalg.norm(m))
    return float(np.linalg.norm(first - m)) / norm if norm > 0 else float(np.linalg.norm(first))
