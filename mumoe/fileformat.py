r"""The portable weights file: one reader, one writer, no PyTorch.

A file is a NumPy ``.npz`` archive of numeric arrays plus one entry,
``__mumoe__``, holding the metadata as UTF-8 JSON bytes: the format name and
version, the kind (``"layer"`` or ``"block"``), each layer's network (spec,
sizes, ranks, bias), the gate (normalisation, activation, top_k, eps) and the input
norm.  It is read with ``allow_pickle=False``: reading it executes nothing.
A file that is truncated, not an archive, holds object arrays, lacks or adds
entries, or whose shapes do not match its own spec is refused with a
``ValueError`` that says what was expected and what came.

:func:`write` and :func:`read_checked` are the only code that touches the
format; :func:`load` builds serving layers (:mod:`mumoe.serving`) from a
file, and :mod:`mumoe.nn.io` writes and reads torch modules through the same
two functions.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorly as tl

from mumoe.network import Network
from mumoe.serving import InferenceMuMoE, InferenceMuMoEBlock
from mumoe.typing import Tensor

__all__ = [
    "FORMAT",
    "VERSION",
    "load",
    "network_meta",
    "read_checked",
    "write",
]

#: The ``format`` field of the metadata, and its version.
FORMAT = "mumoe-weights"
VERSION = 1

PathLike = str | os.PathLike[str]


def network_meta(network: Network) -> dict[str, Any]:
    """The metadata of one layer's network, as a file stores it.

    Parameters
    ----------
    network : Network

    Returns
    -------
    dict
        JSON-ready: spec, expert_dims, in_features, out_features, rank,
        bias and (informative) network_format.

    Examples
    --------
    >>> from mumoe import cp
    >>> network_meta(cp(8, 4, 2, rank=3))["spec"]
    'n1 r, i r, o r'
    """
    return {
        "spec": network.spec,
        "expert_dims": list(network.expert_dims),
        "in_features": network.in_features,
        "out_features": network.out_features,
        "rank": dict(network.ranks),
        "bias": network.bias,
        "network_format": network.format,
    }


def write(path: PathLike, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` and ``meta`` (format and version added) to ``path``.

    Parameters
    ----------
    path : str or path-like
        Written exactly (no extension is added).
    meta : mapping
        JSON-ready metadata: ``kind``, the networks, ``gate``, ``input_norm``.
    arrays : mapping of entry name to numpy.ndarray

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from mumoe import cp
    >>> net = cp(4, 3, 2, rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> arrays = {f"cores.{k}": np.zeros(s) for k, s in enumerate(net.core_shapes)}
    >>> write(path, {"kind": "layer", **network_meta(net), "gate": None, "input_norm": None},
    ...       arrays)
    >>> read_checked(path)[1][""] == net
    True
    """
    data = {name: np.asarray(array) for name, array in arrays.items()}
    full = {"format": FORMAT, "version": VERSION, **meta, "arrays": sorted(data)}
    data["__mumoe__"] = np.frombuffer(json.dumps(full).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **data)  # type: ignore[arg-type]


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


#: The longest spec a file may hold: far above any real network (a Tucker spec with
#: ten levels is about 100 characters), and small enough that parsing is instant.
MAX_SPEC_LENGTH = 4096


def _network(meta: dict[str, Any], path: PathLike) -> Network:
    spec = meta.get("spec")
    if isinstance(spec, str) and len(spec) > MAX_SPEC_LENGTH:
        raise ValueError(
            f"{os.fspath(path)!r} holds a spec of {len(spec):,} characters; files hold specs "
            f"of at most {MAX_SPEC_LENGTH:,} (mumoe.fileformat.MAX_SPEC_LENGTH)"
        )
    try:
        return Network(
            meta["spec"], meta["expert_dims"], meta["in_features"], meta["out_features"],
            rank=meta["rank"] or None, bias=meta["bias"],
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


def read_checked(
    path: PathLike,
) -> tuple[dict[str, Any], dict[str, Network], dict[str, np.ndarray]]:
    """The metadata, networks and arrays of a file, checked against its own spec.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    meta : dict
    networks : dict of str to Network
        ``{"": network}`` for a layer, ``{"fc1.": ..., "fc2.": ...}`` for a
        block (the prefixes of their entries).
    arrays : dict of str to numpy.ndarray

    Raises
    ------
    ValueError
        If the file is unreadable, of another format or version, or its
        entries, shapes or dtypes do not match its own spec.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "junk.npz")
    >>> np.savez(path, x=np.zeros(2))
    >>> read_checked(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: ...has no '__mumoe__' metadata entry
    """
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
    """Read a weights file (:func:`mumoe.inference.save`) onto the active TensorLy backend.

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
    >>> from mumoe import cp
    >>> net = cp(4, 3, 2, rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> arrays = {f"cores.{k}": np.ones(s) for k, s in enumerate(net.core_shapes)}
    >>> write(path, {"kind": "layer", **network_meta(net), "gate": None, "input_norm": None},
    ...       arrays)
    >>> layer = load(path, dtype=np.float32)
    >>> layer(np.ones((5, 3), dtype=np.float32), [np.ones((5, 4), dtype=np.float32)]).shape
    (5, 2)
    """
    meta, networks, arrays = read_checked(path)
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
        "top_k": None if gate is None else gate.get("top_k"),
        "eps": 1e-5 if gate is None else float(gate["eps"]),
    }
    norm = meta.get("input_norm")
    input_norm = None if norm is None else (tensor("input_norm.weight"), tensor("input_norm.bias"))
    input_eps = 1e-5 if norm is None else float(norm["eps"])
    if kind == "layer":
        return InferenceMuMoE(
            first, cores(""), input_norm_affine=input_norm, input_eps=input_eps, **gate_options
        )
    fc1 = InferenceMuMoE(first, cores("fc1."), **gate_options)
    fc2 = InferenceMuMoE(networks["fc2."], cores("fc2."), projections=None)
    return InferenceMuMoEBlock(fc1, fc2, input_norm_affine=input_norm, input_eps=input_eps)
