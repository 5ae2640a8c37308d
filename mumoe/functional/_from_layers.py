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
ttm        TensorLy's ``tensor_train`` over the expert modes and each pair
           of legs :math:`(i_k, o_k)` (the TT-matrix's TT-SVD)
lowrank    each expert's truncated SVD: its best rank-:math:`r` matrix
mxd        (one level) each output column's best rank-1 fit of the experts
           by the inputs, :math:`\mathcal{W}[n, :, o] \approx c_{no} d_{:o}`
=========  ===============================================================

A network that splits its input or output is fitted to the stacked experts
in its legs (:func:`~mumoe.functional.tensor_form`); ``ttm`` is TT-SVD over
the expert modes and the pairs of legs.  Where a decomposition returns
smaller ranks than the network's (a tensor of lower rank), the rest of the
bond is zero in all but one of its cores (:func:`revive_bonds`), so that
training can grow it.  Each expert's relative error
:math:`\|\hat W_n - W_n\|_F / \|W_n\|_F` is returned with the cores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorly as tl
from tensorly.decomposition import parafac, tensor_ring, tensor_ring_als, tensor_train, tucker

from mumoe.backends import thread_backend
from mumoe.functional._forward import materialize, random_cores
from mumoe.functional._legs import tensor_form
from mumoe.spec import Network

__all__ = ["FITS", "cores_from_experts", "expert_errors", "expert_tensor", "revive_bonds"]

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


def _cp(network: Network, tensor: np.ndarray, seed: int, n_iter_max: int = 2000) -> Cores:
    rank = network.ranks["r"]
    options = {"init": "svd", "n_iter_max": n_iter_max, "tol": 1e-12, "random_state": seed}
    with warnings.catch_warnings():
        # A rank above a mode's size: TensorLy completes its SVD start at random, and says so.
        warnings.filterwarnings("ignore", "Trying to compute SVD with n_eigenvecs", UserWarning)
        try:
            with np.errstate(all="raise"):
                weights, factors = parafac(tl.tensor(tensor), rank, **options)
        except (np.linalg.LinAlgError, FloatingPointError):
            # A rank far above the tensor's (a mode of one expert, say) makes the ALS
            # normal equations singular: a ridge of 1e-12 of the squared norm regularises them.
            ridge = 1e-12 * float(np.sum(tensor**2))
            weights, factors = parafac(tl.tensor(tensor), rank, l2_reg=ridge, **options)
    factors = [np.asarray(f) for f in factors]
    factors[0] = factors[0] * np.asarray(weights)[None, :]
    return [_into(s, f) for s, f in zip(_shapes(network), factors, strict=True)]


def _tucker(network: Network, tensor: np.ndarray, seed: int) -> Cores:
    modes = [*network.expert_legs, *network.input_legs, *network.output_legs]
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


def _tr(network: Network, tensor: np.ndarray, seed: int, n_iter_max: int = 200) -> Cores:
    shapes = _shapes(network)
    ranks = [int(s[0]) for s in shapes] + [int(shapes[0][0])]
    try:  # TR-SVD: splits the first mode, so it needs r0 * r1 <= N1
        factors = [np.asarray(f) for f in tensor_ring(tl.tensor(tensor), ranks)]
    except (ValueError, IndexError):  # the ring by alternating least squares instead
        factors = [
            np.asarray(f)
            for f in tensor_ring_als(
                tl.tensor(tensor), ranks, n_iter_max=n_iter_max, tol=1e-10, random_state=seed
            )
        ]
    return [_into(s, f) for s, f in zip(shapes, factors, strict=True)]


def _ttm(network: Network, tensor: np.ndarray, _: int) -> Cores:
    # TT-SVD over the modes (n1, ..., nE, (i1 o1), ..., (iK oK)), then each pair's mode
    # unfolded back into its two legs.
    levels, k = network.n_levels, len(network.input_legs)
    pairs = [axis for j in range(k) for axis in (levels + j, levels + k + j)]
    modes = (
        *network.expert_dims,
        *(i * o for i, o in zip(network.input_sizes, network.out_shape, strict=True)),
    )
    grouped = tensor.transpose(*range(levels), *pairs).reshape(modes)
    shapes = _shapes(network)
    ranks = [1] + [int(s[-1]) for s in shapes[:-1]] + [1]
    factors = [np.asarray(f) for f in tensor_train(tl.tensor(grouped), ranks)]
    for j in range(k):
        f = factors[levels + j]
        size_in, size_out = network.input_sizes[j], network.out_shape[j]
        factors[levels + j] = f.reshape(f.shape[0], size_in, size_out, f.shape[-1])
    factors[0], factors[-1] = factors[0][0], factors[-1][..., 0]
    return [_into(s, f) for s, f in zip(shapes, factors, strict=True)]


def _lowrank(network: Network, tensor: np.ndarray, _: int) -> Cores:
    r = network.ranks["r"]
    lead = tensor.shape[: network.n_levels]
    inputs, outputs = math.prod(network.input_sizes), network.out_features
    u, s, vt = np.linalg.svd(tensor.reshape(-1, inputs, outputs), full_matrices=False)
    k = min(r, s.shape[-1])
    root = np.sqrt(s[:, :k])
    left = (u[:, :, :k] * root[:, None, :]).reshape(*lead, *network.input_sizes, k)
    right = np.swapaxes(vt[:, :k, :], 1, 2) * root[:, None, :]
    shapes = _shapes(network)
    return [_into(shapes[0], left), _into(shapes[1], right.reshape(*lead, *network.out_shape, k))]


def _mxd(network: Network, tensor: np.ndarray, _: int) -> Cores:
    if network.n_levels != 1 and network.n_experts != 1:
        raise ValueError("an MxD network is fitted to several layers with one expert level only")
    # Per output column o: W[:, :, o] (N x I') at its best rank 1, c[:, o] d[:, o]^T (one
    # expert of several levels: the first level's c, ones for the others).
    n, inputs = network.n_experts, math.prod(network.input_sizes)
    columns = np.moveaxis(tensor.reshape(n, inputs, -1), -1, 0)  # (O, N, I')
    u, s, vt = np.linalg.svd(columns, full_matrices=False)
    root = np.sqrt(s[:, 0])
    experts = (u[:, :, 0] * root[:, None]).T  # (N, O)
    weights = (vt[:, 0, :] * root[:, None]).T  # (I', O)
    shapes = _shapes(network)
    others = [np.ones(shape) for shape in shapes[1:-1]]
    return [experts.reshape(shapes[0]), *others, weights.reshape(shapes[-1])]


#: The fits by alternating least squares (CP's, and TR's where TR-SVD cannot split the
#: first mode): they also take ``n_iter_max=``.
ALS_FITS = ("cp", "tr")
#: How each preset format is fitted to stacked experts: ``fit(network, W, seed)``.
FITS: dict[str, Callable[..., Cores]] = {
    "dense": _dense,
    "cp": _cp,
    "tucker": _tucker,
    "tt": _tt,
    "tr": _tr,
    "ttm": _ttm,
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
    expected = network.weight_shape
    if w.shape != expected:
        raise ValueError(
            f"the stacked experts must have shape {expected} (N..., I', O), got {w.shape}"
        )
    with thread_backend("numpy"):
        cores = fit(network, tensor_form(network, w), random_state)
        revive_bonds(network, cores, lambda: random_cores(network, random_state=random_state))
    return cores, expert_errors(network, cores, w)


def revive_bonds(network: Network, cores: Cores, start: Any) -> Cores:
    """Give the unused components of every bond values to grow from, the network unchanged.

    A fit narrower than a bond leaves components that every core holding
    the bond has at zero: a saddle that gradients never leave.  For each such
    component, every core holding the bond but the last (in spec order) takes
    ``start``'s values where the component meets used components of its
    other bonds; the last stays zero there, so ``W`` is unchanged, and its
    gradient is not (nor, once it moves, the others').

    Parameters
    ----------
    network : Network
    cores : list of numpy.ndarray
        Changed in place.
    start : sequence of arrays, or callable
        Cores of the network's shapes to take the values from (its default
        initialisation), or a function of no arguments that returns them,
        called only where some component is unused (a fit that uses every
        bond then draws nothing).

    Returns
    -------
    list of numpy.ndarray
        ``cores``.

    Examples
    --------
    >>> from mumoe import cp, materialize
    >>> net = cp(3, 2, expert_dims=4, rank=3)
    >>> cores = [np.ones((4, 3)), np.ones((4, 3)), np.ones((2, 3))]
    >>> for core in cores:
    ...     core[:, 2] = 0.0  # component 2 is unused by every core
    >>> before = materialize(net, cores)
    >>> revived = revive_bonds(net, [c.copy() for c in cores], [np.full((4, 3), 5.0)] * 3)
    >>> revived[1][:, 2], revived[2][:, 2], bool(np.array_equal(materialize(net, revived), before))
    (array([5., 5., 5., 5.]), array([0., 0.]), True)
    """
    dead: dict[str, np.ndarray] = {}
    for bond in network.bonds:
        used = np.zeros(network.sizes[bond], dtype=bool)
        for core, legs in zip(cores, network.core_legs, strict=True):
            if bond in legs:
                axis = legs.index(bond)
                used |= np.moveaxis(core, axis, 0).reshape(core.shape[axis], -1).any(axis=1)
        dead[bond] = ~used
    if not any(unused.any() for unused in dead.values()):
        return cores
    values = start() if callable(start) else start
    for bond, unused in dead.items():
        if not unused.any():
            continue
        holders = [k for k, legs in enumerate(network.core_legs) if bond in legs]
        for k in holders[:-1]:  # the last holder stays zero there: W is unchanged
            legs, core = network.core_legs[k], cores[k]
            mask = np.ones(core.shape, dtype=bool)
            for axis, leg in enumerate(legs):
                shape = [1] * core.ndim
                shape[axis] = core.shape[axis]
                if leg == bond:
                    mask &= unused.reshape(shape)
                elif leg in dead:
                    mask &= ~dead[leg].reshape(shape)
            core[mask] = np.asarray(values[k], dtype=np.float64)[mask]
    return cores
