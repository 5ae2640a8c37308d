r"""Starting a network from several dense layers: their stacked weights, decomposed.

Given :math:`N_1 \cdots N_E` dense layers :math:`y = x W_n^\top + b_n` (the
experts of a Mixtral-style MoE, or fine-tuned copies of one layer), the
tensor :math:`\mathcal{W}[n_1, \dots, n_E] = [W_n^\top; b_n]` of shape
:math:`(N_1, \dots, N_E, I', O)` (:func:`expert_tensor`) is what a μMoE
layer holds.  :func:`cores_from_experts` fits a preset network to it:

=========  ===============================================================
format     fit
=========  ===============================================================
dense      :math:`\mathcal{W}` itself: exact
cp         TensorLy's ``parafac`` at the network's rank (ALS, SVD start)
tucker     TensorLy's ``tucker`` at the network's ranks (HOOI)
tt         TensorLy's ``tensor_train`` (TT-SVD): exact where the ranks
           reach the unfoldings' ranks
tr         TensorLy's ``tensor_ring`` (TR-SVD), or ``tensor_ring_als`` where
           TR-SVD cannot split the first mode (:math:`r_0 r_1 > N_1`)
lowrank    each expert's truncated SVD: its best rank-:math:`r` matrix
mxd        (one level) each output column's best rank-1 fit of the experts
           by the inputs, :math:`\mathcal{W}[n, :, o] \approx c_{no} d_{:o}`
=========  ===============================================================

Where a decomposition returns smaller ranks than the network's (a tensor of
lower rank), the rest of the bond is zero.  Each expert's relative error
:math:`\|\hat W_n - W_n\|_F / \|W_n\|_F` is returned with the cores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorly as tl
from tensorly.decomposition import parafac, tensor_ring, tensor_ring_als, tensor_train, tucker

from mumoe.backends import thread_backend
from mumoe.functional._forward import materialize
from mumoe.spec import Network

__all__ = ["FITS", "cores_from_experts", "expert_errors", "expert_tensor"]

Cores = list[np.ndarray]


def expert_tensor(weights: Any, biases: Any = None) -> np.ndarray:
    r""":math:`\mathcal{W}[n] = [W_n^\top; b_n]` of stacked dense layers, ``(N..., I', O)``.

    Parameters
    ----------
    weights : array, shape (N_1, ..., N_E, O, I)
        The layers' weights, as ``nn.Linear`` holds them.
    biases : array, shape (N_1, ..., N_E, O), optional

    Returns
    -------
    numpy.ndarray, float64, shape (N_1, ..., N_E, I (+ 1), O)

    Raises
    ------
    ValueError
        If the biases' shape does not fit the weights'.

    Examples
    --------
    >>> expert_tensor(np.ones((4, 2, 3)), np.zeros((4, 2))).shape
    (4, 4, 2)
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim < 3:
        raise ValueError(f"weights must be (N_1, ..., N_E, O, I), got shape {w.shape}")
    tensor = np.swapaxes(w, -1, -2)  # (N..., I, O)
    if biases is None:
        return np.ascontiguousarray(tensor)
    b = np.asarray(biases, dtype=np.float64)
    if b.shape != w.shape[:-1]:
        raise ValueError(f"biases must have shape {w.shape[:-1]} (N..., O), got {b.shape}")
    return np.concatenate([tensor, b[..., None, :]], axis=-2)


def _into(shape: tuple[int, ...], array: np.ndarray) -> np.ndarray:
    # A decomposition's factor in a core of the network's shape: its bonds may be
    # narrower (a tensor of lower rank), the rest of the core zero.
    core = np.zeros(shape)
    if any(a > s for a, s in zip(array.shape, shape, strict=True)):
        raise ValueError(f"a factor of shape {array.shape} does not fit the core {shape}")
    core[tuple(slice(0, a) for a in array.shape)] = array
    return core


def _shapes(network: Network) -> list[tuple[int, ...]]:
    return [tuple(s) for s in network.core_shapes]


def _bond(network: Network, leg: str) -> int:
    # The rank of the factor core of a mode leg (a preset's "n1 r1", "i ri", ...).
    for legs, shape in zip(network.core_legs, network.core_shapes, strict=True):
        if len(legs) == 2 and legs[0] == leg:
            return int(shape[1])
    raise ValueError(f"no factor core holds {leg!r} in {network.spec!r}")


def _dense(network: Network, tensor: np.ndarray, _: int) -> Cores:
    return [tensor.copy()]


def _cp(network: Network, tensor: np.ndarray, seed: int) -> Cores:
    rank = network.ranks["r"]
    with warnings.catch_warnings():
        # A rank above a mode's size: TensorLy completes its SVD start at random, and says so.
        warnings.filterwarnings("ignore", "Trying to compute SVD with n_eigenvecs", UserWarning)
        weights, factors = parafac(
            tl.tensor(tensor), rank, init="svd", n_iter_max=2000, tol=1e-12, random_state=seed
        )
    factors = [np.asarray(f) for f in factors]
    factors[0] = factors[0] * np.asarray(weights)[None, :]
    return [_into(s, f) for s, f in zip(_shapes(network), factors, strict=True)]


def _tucker(network: Network, tensor: np.ndarray, seed: int) -> Cores:
    modes = [*network.expert_legs, "i", "o"]
    ranks = [min(_bond(network, leg), size) for leg, size in zip(modes, tensor.shape, strict=True)]
    core, factors = tucker(
        tl.tensor(tensor), ranks, init="svd", n_iter_max=500, tol=1e-12, random_state=seed
    )
    parts = [np.asarray(f) for f in factors] + [np.asarray(core)]
    return [_into(s, f) for s, f in zip(_shapes(network), parts, strict=True)]


def _tt(network: Network, tensor: np.ndarray, _: int) -> Cores:
    shapes = _shapes(network)
    ranks = [1] + [int(s[-1]) for s in shapes[:-1]] + [1]
    factors = [np.asarray(f) for f in tensor_train(tl.tensor(tensor), ranks)]
    factors[0], factors[-1] = factors[0][0], factors[-1][..., 0]
    return [_into(s, f) for s, f in zip(shapes, factors, strict=True)]


def _tr(network: Network, tensor: np.ndarray, seed: int) -> Cores:
    shapes = _shapes(network)
    ranks = [int(s[0]) for s in shapes] + [int(shapes[0][0])]
    try:  # TR-SVD: splits the first mode, so it needs r0 * r1 <= N1
        factors = [np.asarray(f) for f in tensor_ring(tl.tensor(tensor), ranks)]
    except (ValueError, IndexError):  # the ring by alternating least squares instead
        factors = [
            np.asarray(f)
            for f in tensor_ring_als(
                tl.tensor(tensor), ranks, n_iter_max=200, tol=1e-10, random_state=seed
            )
        ]
    return [_into(s, f) for s, f in zip(shapes, factors, strict=True)]


def _lowrank(network: Network, tensor: np.ndarray, _: int) -> Cores:
    r = network.ranks["r"]
    lead = tensor.shape[:-2]
    u, s, vt = np.linalg.svd(tensor.reshape(-1, *tensor.shape[-2:]), full_matrices=False)
    k = min(r, s.shape[-1])
    root = np.sqrt(s[:, :k])
    left = (u[:, :, :k] * root[:, None, :]).reshape(*lead, tensor.shape[-2], k)
    right = (np.swapaxes(vt[:, :k, :], 1, 2) * root[:, None, :]).reshape(*lead, -1, k)
    shapes = _shapes(network)
    return [_into(shapes[0], left), _into(shapes[1], right)]


def _mxd(network: Network, tensor: np.ndarray, _: int) -> Cores:
    if network.n_levels != 1:
        raise ValueError("an MxD network is fitted to several layers with one expert level only")
    # Per output column o: W[:, :, o] (N x I') at its best rank 1, c[:, o] d[:, o]^T.
    columns = np.moveaxis(tensor, -1, 0)  # (O, N, I')
    u, s, vt = np.linalg.svd(columns, full_matrices=False)
    root = np.sqrt(s[:, 0])
    experts = (u[:, :, 0] * root[:, None]).T  # (N, O)
    inputs = (vt[:, 0, :] * root[:, None]).T  # (I', O)
    return [experts, inputs]


#: How each preset format is fitted to stacked experts: ``fit(network, W, seed)``.
FITS: dict[str, Callable[[Network, np.ndarray, int], Cores]] = {
    "dense": _dense,
    "cp": _cp,
    "tucker": _tucker,
    "tt": _tt,
    "tr": _tr,
    "lowrank": _lowrank,
    "mxd": _mxd,
}


def expert_errors(network: Network, cores: Any, tensor: Any) -> np.ndarray:
    r"""Each expert's relative error :math:`\|\hat W_n - W_n\|_F / \|W_n\|_F`.

    Parameters
    ----------
    network : Network
    cores : sequence of arrays
    tensor : array, shape (N_1, ..., N_E, I', O)

    Returns
    -------
    numpy.ndarray, shape (N_1, ..., N_E)
        The absolute error where an expert is zero.

    Examples
    --------
    >>> from mumoe import dense
    >>> net = dense(2, 3, expert_dims=4, bias=False)
    >>> w = np.random.default_rng(0).normal(size=(4, 2, 3))
    >>> expert_errors(net, [w], w)
    array([0., 0., 0., 0.])
    """
    with thread_backend("numpy"):
        fitted = np.asarray(materialize(network, [np.asarray(c, dtype=np.float64) for c in cores]))
    w = np.asarray(tensor, dtype=np.float64)
    difference = np.linalg.norm((fitted - w).reshape(*w.shape[:-2], -1), axis=-1)
    norms = np.linalg.norm(w.reshape(*w.shape[:-2], -1), axis=-1)
    return np.where(norms > 0, difference / np.where(norms > 0, norms, 1), difference)


def cores_from_experts(
    network: Network, tensor: Any, *, random_state: int = 0
) -> tuple[Cores, np.ndarray]:
    r"""The cores of ``network`` fitted to stacked experts, and each expert's error.

    Parameters
    ----------
    network : Network
        Of a preset format (:data:`FITS`), its expert levels the tensor's.
    tensor : array, shape (N_1, ..., N_E, I', O)
        :func:`expert_tensor` of the layers (bias rows where the network has
        a bias).
    random_state : int, default 0
        For the decompositions that draw (none with their default SVD starts).

    Returns
    -------
    cores : list of numpy.ndarray
        float64, of the network's shapes.
    errors : numpy.ndarray, shape (N_1, ..., N_E)
        :func:`expert_errors` of the fit.

    Raises
    ------
    ValueError
        If the network's format has no fit (a custom spec), or the tensor's
        shape is not the network's.

    Examples
    --------
    >>> from mumoe import tt
    >>> w = np.random.default_rng(0).normal(size=(4, 3, 5, 2))  # 4 x 3 experts, I' = 5, O = 2
    >>> cores, errors = cores_from_experts(tt(5, 2, expert_dims=(4, 3), rank=(4, 10, 2),
    ...                                       bias=False), w)
    >>> errors.shape, bool(errors.max() < 1e-10)  # TT at the unfoldings' ranks: exact
    ((4, 3), True)
    """
    fit = FITS.get(network.format)
    if fit is None:
        raise ValueError(
            f"no rule fits a {network.format!r} network ({network.spec!r}) to several layers; "
            f"the formats with one are {', '.join(map(repr, FITS))}"
        )
    w = np.asarray(tensor, dtype=np.float64)
    expected = (*network.expert_dims, network.sizes["i"], network.out_features)
    if w.shape != expected:
        raise ValueError(
            f"the stacked experts must have shape {expected} (N..., I', O), got {w.shape}"
        )
    with thread_backend("numpy"):
        cores = fit(network, w, random_state)
    return cores, expert_errors(network, cores, w)
