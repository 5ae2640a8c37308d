r"""Serving μMoE layers on any backend, and portable weight files.

:func:`save` writes a trained :class:`mumoe.nn.MuMoE` or
:class:`mumoe.nn.MuMoEBlock` (cores, gate projections, batch-norm running
statistics, input layer norm, network specs and gating configuration) to a
``.npz`` file; :func:`load` reads it back as an :class:`InferenceMuMoE` or
:class:`InferenceMuMoEBlock` on the active TensorLy backend (NumPy, CuPy,
PyTorch), which computes it in eval mode with :mod:`mumoe.gating` — no
PyTorch needed — and :func:`load_into` reads it into an existing torch
module, all or nothing.

The file is a NumPy ``.npz`` archive of numeric arrays plus one entry,
``__mumoe__``, holding the metadata as UTF-8 JSON bytes.  It is read with
``allow_pickle=False``: reading it executes nothing.  A file that is
truncated, not an archive, holds object arrays, lacks or adds entries, or
whose shapes do not match its own spec is refused with a ``ValueError`` that
says what was expected and what came.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorly as tl

from mumoe import functional
from mumoe.gating import ACTIVATIONS, batch_norm, gate_coefficients, gelu, layer_norm
from mumoe.network import Network
from mumoe.typing import Tensor

__all__ = [
    "FORMAT",
    "VERSION",
    "InferenceMuMoE",
    "InferenceMuMoEBlock",
    "load",
    "load_into",
    "save",
]

#: The ``format`` field of the metadata, and its version.
FORMAT = "mumoe-weights"
VERSION = 1

PathLike = str | os.PathLike[str]


class InferenceMuMoE:
    r"""A μMoE layer in eval mode on the active TensorLy backend.

    Computes the same function as :class:`mumoe.nn.MuMoE` in ``eval()``
    mode: gates from the input (batch norm from running statistics, layer
    norm, or none; then the named activation), the optional input layer norm,
    and Eq. 1 contracted along the network's plan.

    Parameters
    ----------
    network : Network
    cores : sequence of tensors
        Of shapes ``network.core_shapes``.
    projections : sequence of tensors, each (I, N_e), optional
        The gate projections; without them, calls need ``gates``.
    normalization : {"bn", "ln", None}
    running_mean, running_var : sequences of tensors, each (N_e,)
        With ``"bn"``.
    activation : {"entmax15", "sparsemax", "softmax"}
    input_norm : tuple of (weight, bias), optional
        The input layer norm's affine parameters, each (I,).
    eps : float
        Of the gate's normalisation.
    input_eps : float
        Of the input layer norm.

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, random_cores
    >>> net = cp(8, 6, 4, rank=3)
    >>> layer = InferenceMuMoE(net, random_cores(net, random_state=0),
    ...                        projections=[np.zeros((6, 8))], normalization=None)
    >>> layer(np.ones((5, 6))).shape
    (5, 4)
    """

    def __init__(
        self,
        network: Network,
        cores: Sequence[Tensor],
        *,
        projections: Sequence[Tensor] | None = None,
        normalization: str | None = "bn",
        running_mean: Sequence[Tensor] | None = None,
        running_var: Sequence[Tensor] | None = None,
        activation: str = "entmax15",
        input_norm: tuple[Tensor, Tensor] | None = None,
        eps: float = 1e-5,
        input_eps: float = 1e-5,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown gate activation {activation!r}; choose one of "
                f"{', '.join(map(repr, ACTIVATIONS))}"
            )
        if normalization not in ("bn", "ln", None):
            raise ValueError(
                f"unknown gate normalization {normalization!r}; choose 'bn', 'ln' or None"
            )
        if (
            normalization == "bn"
            and projections is not None
            and (running_mean is None or running_var is None)
        ):
            raise ValueError("batch-norm gating needs running_mean and running_var")
        self.network = network
        self.cores = list(cores)
        self.projections = None if projections is None else list(projections)
        self.normalization = normalization
        self.running_mean = None if running_mean is None else list(running_mean)
        self.running_var = None if running_var is None else list(running_var)
        self.activation = activation
        self.input_norm = input_norm
        self.eps = eps
        self.input_eps = input_eps

    def gates(self, x: Tensor) -> list[Tensor]:
        """The gate coefficients of every level.

        Parameters
        ----------
        x : tensor, shape (..., I)

        Returns
        -------
        list of tensors, each (..., N_e)

        Raises
        ------
        ValueError
            If the layer has no gate.

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp, random_cores
        >>> net = cp((3, 2), 4, 5, rank=2)
        >>> projections = [np.zeros((4, 3)), np.zeros((4, 2))]
        >>> layer = InferenceMuMoE(net, random_cores(net), projections=projections,
        ...                        normalization=None, activation="softmax")
        >>> layer.gates(np.ones((1, 4)))
        [array([[0.33333333, 0.33333333, 0.33333333]]), array([[0.5, 0.5]])]
        """
        if self.projections is None:
            raise ValueError("this layer has no gate: pass gates to the call")
        norms: list[Any]
        if self.normalization == "bn" and self.running_mean and self.running_var:
            norms = [
                (lambda z, m=m, v=v: batch_norm(z, m, v, self.eps))
                for m, v in zip(self.running_mean, self.running_var, strict=True)
            ]
        elif self.normalization == "ln":
            norms = [lambda z: layer_norm(z, eps=self.eps)] * len(self.projections)
        else:
            norms = [None] * len(self.projections)
        return gate_coefficients(x, self.projections, norms, ACTIVATIONS[self.activation])

    def _check(self, x: Tensor) -> None:
        n_in = self.network.in_features
        if not tl.is_tensor(x) or len(tl.shape(x)) == 0 or tl.shape(x)[-1] != n_in:
            shape = tuple(tl.shape(x)) if tl.is_tensor(x) else type(x).__qualname__
            raise ValueError(
                f"input must be a tensor of the active backend with shape (..., {n_in}), "
                f"got {shape}"
            )

    def __call__(self, x: Tensor, gates: Sequence[Tensor] | None = None) -> Tensor:
        """The layer's output for ``x`` of shape ``(..., I)``: shape ``(..., O)``."""
        self._check(x)
        if gates is None:
            gates = self.gates(x)
        z = x if self.input_norm is None else layer_norm(x, *self.input_norm, eps=self.input_eps)
        return functional.forward(self.network, self.cores, z, gates, differentiable=False)

    def __repr__(self) -> str:
        return (
            f"InferenceMuMoE({self.network!r}, normalization={self.normalization!r}, "
            f"activation={self.activation!r}, backend={tl.get_backend()!r})"
        )


class InferenceMuMoEBlock:
    r"""The two-layer μMoE block in eval mode on the active TensorLy backend.

    ``fc2(gelu(fc1(norm(x), a)), a)`` with ``a = fc1.gates(x)``, as
    :class:`mumoe.nn.MuMoEBlock`; GELU is exact (see :func:`mumoe.gating.gelu`).

    Parameters
    ----------
    fc1 : InferenceMuMoE
        The first layer, which holds the block's gate.
    fc2 : InferenceMuMoE
        The second layer.
    input_norm : tuple of (weight, bias), optional
        The block's input layer norm.
    input_eps : float

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, random_cores
    >>> first, second = cp(4, 6, 10, rank=2), cp(4, 10, 6, rank=2)
    >>> fc1 = InferenceMuMoE(first, random_cores(first), projections=[np.zeros((6, 4))],
    ...                      normalization=None)
    >>> fc2 = InferenceMuMoE(second, random_cores(second))
    >>> InferenceMuMoEBlock(fc1, fc2)(np.ones((2, 6))).shape
    (2, 6)
    """

    def __init__(
        self,
        fc1: InferenceMuMoE,
        fc2: InferenceMuMoE,
        *,
        input_norm: tuple[Tensor, Tensor] | None = None,
        input_eps: float = 1e-5,
    ) -> None:
        if fc1.network.out_features != fc2.network.in_features:
            raise ValueError(
                f"fc1 gives {fc1.network.out_features} features but fc2 takes "
                f"{fc2.network.in_features}"
            )
        self.fc1, self.fc2 = fc1, fc2
        self.input_norm = input_norm
        self.input_eps = input_eps

    def __call__(self, x: Tensor) -> Tensor:
        """The block's output for ``x`` of shape ``(..., I)``: shape ``(..., O)``."""
        self.fc1._check(x)
        gates = self.fc1.gates(x)
        z = x if self.input_norm is None else layer_norm(x, *self.input_norm, eps=self.input_eps)
        return self.fc2(gelu(self.fc1(z, gates)), gates)

    def __repr__(self) -> str:
        return f"InferenceMuMoEBlock(fc1={self.fc1!r}, fc2={self.fc2!r})"


# ------------------------------------------------------------------ saving


def _network_meta(network: Network) -> dict[str, Any]:
    return {
        "spec": network.spec,
        "expert_dims": list(network.expert_dims),
        "in_features": network.in_features,
        "out_features": network.out_features,
        "rank": dict(network.ranks),
        "bias": network.bias,
        "network_format": network.format,
    }


def _describe(module: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata of a torch layer or block, and its tensors by file entry name."""
    import torch

    from mumoe.nn import MuMoE, MuMoEBlock

    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if isinstance(module, MuMoE):
        meta["kind"] = "layer"
        meta.update(_network_meta(module.network))
        layers = {"": module}
    elif isinstance(module, MuMoEBlock):
        meta["kind"] = "block"
        meta["fc1"] = _network_meta(module.fc1.network)
        meta["fc2"] = _network_meta(module.fc2.network)
        layers = {"fc1.": module.fc1, "fc2.": module.fc2}
    else:
        raise TypeError(
            "save and load_into take a mumoe.nn.MuMoE or MuMoEBlock, "
            f"got {type(module).__qualname__}"
        )
    tensors: dict[str, Any] = {}
    for prefix, layer in layers.items():
        for k, core in enumerate(layer._weights()[1]):
            tensors[f"{prefix}cores.{k}"] = core

    meta["gate"] = None
    if module.gate is not None:
        gate = module.gate
        if gate.activation_name not in ACTIVATIONS:
            raise ValueError(
                f"the gate's activation {gate.activation_name!r} is a custom callable and "
                f"cannot be saved; portable layers use one of {', '.join(map(repr, ACTIVATIONS))}"
            )
        eps = 1e-5
        for e, projection in enumerate(gate.projections):
            tensors[f"gate.projections.{e}"] = projection
        for e, norm in enumerate(gate.norms):
            if isinstance(norm, torch.nn.BatchNorm1d):
                tensors[f"gate.running_mean.{e}"] = norm.running_mean
                tensors[f"gate.running_var.{e}"] = norm.running_var
                eps = norm.eps
            elif isinstance(norm, torch.nn.LayerNorm):
                eps = norm.eps
        meta["gate"] = {
            "normalization": gate.normalization,
            "activation": gate.activation_name,
            "eps": eps,
        }
    meta["input_norm"] = None
    if module.input_norm is not None:
        tensors["input_norm.weight"] = module.input_norm.weight
        tensors["input_norm.bias"] = module.input_norm.bias
        meta["input_norm"] = {"eps": module.input_norm.eps}
    return meta, tensors


def save(module: Any, path: PathLike) -> None:
    """Write a :class:`mumoe.nn.MuMoE` or :class:`mumoe.nn.MuMoEBlock` to a portable file.

    Parameters
    ----------
    module : mumoe.nn.MuMoE or mumoe.nn.MuMoEBlock
        A torch layer or block whose gate uses a named activation.
    path : str or path-like
        Written exactly (no extension is added).

    Raises
    ------
    TypeError
        If ``module`` is neither.
    ValueError
        If its gate uses a custom activation callable (code is not saved).

    Examples
    --------
    >>> import os, tempfile
    >>> from mumoe.nn import CPMuMoE
    >>> path = os.path.join(tempfile.mkdtemp(), "head.npz")
    >>> save(CPMuMoE(16, 4, 8, rank=3).eval(), path)
    >>> served = load(path)
    >>> served.network, served.activation
    (Network('n1 r, i r, o r', 8, 16, 4, rank={'r': 3}, bias=True, format='cp'), 'entmax15')
    """
    import torch

    meta, tensors = _describe(module)
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if tensor is None:  # batch norm built without running statistics
            raise ValueError("the gate's batch norm tracks no running statistics to save")
        host = tensor.detach().cpu()
        if host.dtype == torch.bfloat16:  # NumPy has no bfloat16: widen, exactly
            host = host.float()
        arrays[name] = host.numpy()
    meta["arrays"] = sorted(arrays)
    arrays["__mumoe__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


# ----------------------------------------------------------------- loading


def _read(path: PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable mumoe weights file (expected an .npz archive "
            f"of numeric arrays written by mumoe.inference.save; it may be truncated or "
            f"corrupt): {error}"
        ) from error
    raw = arrays.pop("__mumoe__", None)
    if raw is None:
        raise ValueError(f"{os.fspath(path)!r} has no '__mumoe__' metadata entry")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{os.fspath(path)!r} has unreadable metadata: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has version {meta.get('version')!r}; this mumoe reads "
            f"version {VERSION}"
        )
    return meta, arrays


def _network(meta: dict[str, Any], path: PathLike) -> Network:
    try:
        return Network(
            meta["spec"], meta["expert_dims"], meta["in_features"], meta["out_features"],
            rank=meta["rank"] or None, bias=meta["bias"],
            format=meta.get("network_format", "custom"),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)!r} describes an invalid network: {error}") from error


def _expected(networks: dict[str, Network], meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, network in networks.items():
        shapes.update({f"{prefix}cores.{k}": s for k, s in enumerate(network.core_shapes)})
    first = next(iter(networks.values()))
    gate = meta.get("gate")
    if gate is not None:
        for e, n in enumerate(first.expert_dims):
            shapes[f"gate.projections.{e}"] = (first.in_features, n)
            if gate.get("normalization") == "bn":
                shapes[f"gate.running_mean.{e}"] = (n,)
                shapes[f"gate.running_var.{e}"] = (n,)
    if meta.get("input_norm") is not None:
        shapes["input_norm.weight"] = (first.in_features,)
        shapes["input_norm.bias"] = (first.in_features,)
    return shapes


def _read_checked(
    path: PathLike,
) -> tuple[dict[str, Any], dict[str, Network], dict[str, np.ndarray]]:
    """The metadata, networks and arrays of a file, checked against its own spec."""
    meta, arrays = _read(path)
    kind = meta.get("kind")
    if kind == "layer":
        networks = {"": _network(meta, path)}
    elif kind == "block":
        networks = {"fc1.": _network(meta.get("fc1", {}), path),
                    "fc2.": _network(meta.get("fc2", {}), path)}  # fmt: skip
    else:
        raise ValueError(f"{os.fspath(path)!r} holds a {kind!r}; mumoe reads layers and blocks")
    spec = " / ".join(network.spec for network in networks.values())
    expected = _expected(networks, meta)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{os.fspath(path)!r} does not match its spec {spec!r}: "
            f"missing entries {missing}, unexpected entries {extra}"
        )
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(
                f"{os.fspath(path)!r}: entry {name!r} must have shape {shape} for spec "
                f"{spec!r}, got {arrays[name].shape}"
            )
        if arrays[name].dtype.kind != "f":
            raise ValueError(
                f"{os.fspath(path)!r}: entry {name!r} must be floating point, got "
                f"{arrays[name].dtype}"
            )
    return meta, networks, arrays


def load(path: PathLike, *, dtype: Any = None) -> InferenceMuMoE | InferenceMuMoEBlock:
    """Read a file written by :func:`save` onto the active TensorLy backend.

    Parameters
    ----------
    path : str or path-like
    dtype : backend dtype, optional
        Cast every array to it (e.g. ``tl.backend.float64``); by default the
        saved dtype.

    Returns
    -------
    InferenceMuMoE or InferenceMuMoEBlock
        As the file holds a layer or a block.

    Raises
    ------
    ValueError
        If the file is not a readable mumoe weights file, or its entries or
        shapes do not match its own spec.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from mumoe.nn import MuMoEBlock
    >>> path = os.path.join(tempfile.mkdtemp(), "block.npz")
    >>> save(MuMoEBlock(8, 32, expert_dims=4, rank=2).eval(), path)
    >>> block = load(path, dtype=np.float32)
    >>> block(np.ones((3, 8), dtype=np.float32)).shape
    (3, 8)
    """
    meta, networks, arrays = _read_checked(path)
    kind = meta["kind"]

    def tensor(name: str) -> Tensor:
        array = arrays[name]
        return tl.tensor(array) if dtype is None else tl.tensor(array, dtype=dtype)

    def cores(prefix: str) -> list[Tensor]:
        return [tensor(f"{prefix}cores.{k}") for k in range(networks[prefix].n_cores)]

    gate = meta.get("gate")
    first = next(iter(networks.values()))
    levels = range(first.n_levels)
    bn = gate is not None and gate["normalization"] == "bn"
    gate_options: dict[str, Any] = {
        "projections": None if gate is None else [tensor(f"gate.projections.{e}") for e in levels],
        "normalization": None if gate is None else gate["normalization"],
        "running_mean": [tensor(f"gate.running_mean.{e}") for e in levels] if bn else None,
        "running_var": [tensor(f"gate.running_var.{e}") for e in levels] if bn else None,
        "activation": "entmax15" if gate is None else gate["activation"],
        "eps": 1e-5 if gate is None else float(gate["eps"]),
    }
    norm = meta.get("input_norm")
    input_norm = None if norm is None else (tensor("input_norm.weight"), tensor("input_norm.bias"))
    input_eps = 1e-5 if norm is None else float(norm["eps"])
    if kind == "layer":
        return InferenceMuMoE(
            first, cores(""), input_norm=input_norm, input_eps=input_eps, **gate_options
        )
    fc1 = InferenceMuMoE(first, cores("fc1."), **gate_options)
    fc2 = InferenceMuMoE(networks["fc2."], cores("fc2."), projections=None)
    return InferenceMuMoEBlock(fc1, fc2, input_norm=input_norm, input_eps=input_eps)


def load_into(module: Any, path: PathLike) -> None:
    """Read a file written by :func:`save` into a torch layer or block, all or nothing.

    Everything is checked before anything is written: the file itself (as
    :func:`load` checks it), and that it describes ``module`` — the same kind
    (layer or block), networks, gate (normalisation, activation, eps) and
    input norm.  Only then are the values copied into the module's
    parameters and buffers (converted to their dtype and device).  If a check
    fails, the module is left exactly as it was.

    Parameters
    ----------
    module : mumoe.nn.MuMoE or mumoe.nn.MuMoEBlock
        A module whose cores are its own parameters.
    path : str or path-like

    Raises
    ------
    ValueError
        If the file is unreadable or inconsistent, or describes another
        module; the message names the first difference.
    TypeError
        If ``module`` is not a μMoE layer or block, or does not own its cores
        (a :class:`mumoe.nn.FactorizedMuMoE`).

    Examples
    --------
    >>> import os, tempfile
    >>> import torch
    >>> from mumoe.nn import TRMuMoE
    >>> path = os.path.join(tempfile.mkdtemp(), "layer.npz")
    >>> trained = TRMuMoE(8, 4, 6, rank=(2, 2, 3)).eval()
    >>> save(trained, path)
    >>> fresh = TRMuMoE(8, 4, 6, rank=(2, 2, 3)).eval()
    >>> load_into(fresh, path)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(fresh(x), trained(x))
    True
    """
    import torch

    meta, _, arrays = _read_checked(path)
    own, tensors = _describe(module)
    layers = [module] if own["kind"] == "layer" else [module.fc1, module.fc2]
    if not all(layer._owns_cores for layer in layers):
        raise TypeError(
            f"{type(module).__qualname__} takes its cores from elsewhere; load_into writes "
            "the cores of a MuMoE or MuMoEBlock"
        )
    for key in ("kind", "spec", "expert_dims", "in_features", "out_features", "rank", "bias",
                "network_format", "fc1", "fc2", "gate", "input_norm"):  # fmt: skip
        if meta.get(key) != own.get(key):
            raise ValueError(
                f"{os.fspath(path)!r} holds a different module: its {key} is "
                f"{meta.get(key)!r}, the module's is {own.get(key)!r}"
            )
    for name, tensor in tensors.items():  # the same networks: the same shapes
        if tensor is None or tuple(tensor.shape) != arrays[name].shape:
            raise ValueError(
                f"{os.fspath(path)!r}: entry {name!r} has shape {arrays[name].shape}, "
                f"the module's is {None if tensor is None else tuple(tensor.shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(torch.from_numpy(arrays[name]))
