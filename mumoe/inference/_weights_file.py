r"""The portable weights file: one reader, one writer, no PyTorch.

A file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file:
a size-checked JSON header, then the arrays, little-endian by specification;
reading it executes nothing.  The header's string metadata holds, under
``"mumoe"``, the description as JSON: the format name and version, the kind
(``"layer"`` or ``"block"``), each layer's network (spec, sizes, ranks,
bias), the gate (normalisation, activation, top_k, eps) and the input norm.

The reader trusts nothing.  It refuses a path that is not a regular file
(a FIFO, ``/dev/zero``) before opening it, lets ``safetensors`` check the
header against the file's size (no tensor may claim bytes the file does not
hold), validates the description in full — types, lengths, nesting, the
spec — before it reads any tensor, and checks every tensor's name, shape and
dtype against what the description implies.  Each failure is a
``ValueError`` that names what was wrong; memory stays within the file's
size.  A ZIP archive (``torch.save``, ``numpy.savez``), a pickle, an ``.npy``
or an HDF5 file is named as what it is.  The writer writes a temporary file
and renames it over ``path``, so a reader never sees half a file; the file
gets the mode ``open`` would give it, and a failure names ``path``.

:func:`write` and :func:`read_checked` are the only code that touches the
format; :func:`load` builds serving layers from a file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
import tensorly as tl

from mumoe.gates import check_hidden_activation
from mumoe.inference._files import write_atomically
from mumoe.inference._layers import InferenceLinear, InferenceMuMoE, InferenceMuMoEBlock
from mumoe.spec import Network
from mumoe.typing import PathLike, Tensor

__all__ = [
    "FORMAT",
    "VERSION",
    "check_values_fit",
    "load",
    "network_meta",
    "read_checked",
    "write",
]

#: The ``format`` field of the metadata, and its version (2: safetensors; 1 was .npz).
FORMAT = "mumoe-weights"
VERSION = 2

#: The dtypes a file's arrays may have (safetensors' names).
DTYPES = ("F16", "F32", "F64")


def network_meta(network: Network) -> dict[str, Any]:
    """The metadata of one layer's network, as a file stores it.

    Parameters
    ----------
    network : Network

    Returns
    -------
    dict
        JSON-ready: spec, expert_dims, in_features, out_features, rank,
        bias, (informative) network_format, and in_shape/out_shape where the
        spec splits the input/output.

    Examples
    --------
    >>> from mumoe import cp
    >>> network_meta(cp(4, 2, expert_dims=8, rank=3))["spec"]
    'n1 r, i r, o r'
    """
    meta: dict[str, Any] = {
        "spec": network.spec,
        "expert_dims": list(network.expert_dims),
        "in_features": network.in_features,
        "out_features": network.out_features,
        "rank": dict(network.ranks),
        "bias": network.bias,
        "network_format": network.format,
    }
    meta.update(_split_shapes(network))
    return meta


def _split_shapes(network: Network) -> dict[str, list[int]]:
    # in_shape and out_shape of the modes the network splits (absent for unsplit ones,
    # so that the files of unsplit networks are as they were).
    shapes = {
        "in_shape": (network.in_shape, network.splits_input),
        "out_shape": (network.out_shape, network.splits_output),
    }
    return {name: list(shape) for name, (shape, split) in shapes.items() if split}


def write(path: PathLike, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` and ``meta`` (format and version added) to ``path``, atomically.

    Parameters
    ----------
    path : str or path-like
        Written exactly (no extension is added; ``.safetensors`` is the
        convention): a temporary file in the same folder, renamed over it.
    meta : mapping
        JSON-ready metadata: ``kind``, the networks, ``gate``, ``input_norm``.
    arrays : mapping of entry name to numpy.ndarray
        Floating arrays (float16, float32 or float64).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from mumoe import cp
    >>> net = cp(3, 2, expert_dims=4, rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> arrays = {f"cores.{k}": np.zeros(s) for k, s in enumerate(net.core_shapes)}
    >>> write(path, {"kind": "layer", **network_meta(net), "gate": None, "input_norm": None},
    ...       arrays)
    >>> read_checked(path)[1][""] == net
    True
    """
    data = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    full = {"format": FORMAT, "version": VERSION, **meta}
    payload = safetensors.numpy.save(data, metadata={"mumoe": json.dumps(full)})
    write_atomically(path, payload, "the weights file")


#: The longest description (JSON) a file may hold: a real one is about a kilobyte.
MAX_DESCRIPTION = 1 << 16

#: The largest safetensors header a file may declare (the description and one entry of
#: about 100 bytes per tensor): checked before the header is parsed.
MAX_HEADER = 1 << 20

#: Limits on the description: nesting and the number of expert levels.
_MAX_DEPTH = 8
_MAX_LEVELS = 64


def _refuse(path: PathLike, what: str) -> ValueError:
    return ValueError(f"{os.fspath(path)!r} is not a readable mumoe weights file: {what}")


def _depth(value: Any, limit: int = _MAX_DEPTH) -> int:
    # The nesting of a JSON value, counted iteratively (no recursion on hostile input).
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


_TORCH_HINT = (
    "load it with torch.load and the module's load_state_dict; mumoe.nn.save(layer, path) "
    "then writes a mumoe weights file"
)


def _foreign(path: PathLike, start: bytes) -> str | None:
    """What a file of another format is, from its first bytes, and what to do with it."""
    if start.startswith(b"PK\x03\x04"):  # a ZIP archive: torch.save and numpy.savez
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()[:10_000]
        except (OSError, zipfile.BadZipFile, ValueError):
            names = []
        if any(name.endswith("data.pkl") for name in names):
            return f"it is a PyTorch checkpoint (torch.save's ZIP archive); {_TORCH_HINT}"
        if names and all(name.endswith(".npy") for name in names):
            return (
                "it is a NumPy .npz archive (mumoe's weights files were .npz before version "
                f"{VERSION}, which this mumoe no longer reads); numpy.load reads its arrays: "
                "copy them into a layer and save it with mumoe.nn.save"
            )
        return "it is a ZIP archive; mumoe weights files are safetensors files"
    if start[:1] == b"\x80":
        return f"it is a Python pickle (a legacy torch.save checkpoint?); {_TORCH_HINT}"
    if start.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy array; mumoe weights files are safetensors files"
    if start.startswith(b"\x89HDF"):
        return "it is an HDF5 file; mumoe weights files are safetensors files"
    return None


#: A tensor of the file: its dtype (safetensors' name), shape and byte range.
Entry = tuple[str, tuple[int, ...], tuple[int, int]]


def _read(path: PathLike) -> tuple[dict[str, Any], dict[str, Entry], Any]:
    """The description, the tensors' dtype, shape and bytes, and an open safetensors handle."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise _refuse(path, f"cannot stat it ({error})") from error
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(path, "not a regular file (a FIFO, device or folder is never read)")
    try:
        with open(path, "rb") as f:
            declared = int.from_bytes(f.read(8), "little")
            header = f.read(declared) if declared <= MAX_HEADER else b""
    except OSError as error:
        raise _refuse(path, f"cannot read it ({error})") from error
    if declared > MAX_HEADER:  # before safetensors parses (and copies) a huge header
        foreign = _foreign(path, declared.to_bytes(8, "little"))
        if foreign is not None:
            raise _refuse(path, foreign)
        raise _refuse(
            path,
            f"its header declares {declared:,} bytes; mumoe files have headers of at "
            f"most {MAX_HEADER:,} (mumoe.inference.MAX_HEADER)",
        )
    try:
        handle = safetensors.safe_open(os.fspath(path), framework="numpy")
        raw = (handle.metadata() or {}).get("mumoe")
        tensors = {}
        # Where each tensor's bytes lie: read from the header safetensors has just checked.
        layout = json.loads(header)
        start = 8 + declared
        for name in handle.keys():
            piece = handle.get_slice(name)
            begin, end = (start + int(offset) for offset in layout[name]["data_offsets"])
            shape = tuple(int(d) for d in piece.get_shape())
            tensors[name] = (str(piece.get_dtype()), shape, (begin, end))
    except (safetensors.SafetensorError, OSError, ValueError, TypeError, KeyError) as error:
        raise _refuse(
            path,
            f"expected a safetensors file written by mumoe.nn.save; it may be "
            f"truncated or corrupt ({type(error).__name__}: {error})",
        ) from error
    if not isinstance(raw, str):
        raise ValueError(f"{os.fspath(path)!r} has no 'mumoe' description in its metadata")
    if len(raw) > MAX_DESCRIPTION:
        raise ValueError(
            f"{os.fspath(path)!r} has a description of {len(raw):,} characters; files hold "
            f"at most {MAX_DESCRIPTION:,} (mumoe.inference.MAX_DESCRIPTION)"
        )
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as error:  # ValueError: also an int of 5,000 digits
        raise ValueError(f"{os.fspath(path)!r} has unreadable metadata: {error}") from None
    if _depth(meta) > _MAX_DEPTH:
        raise ValueError(f"{os.fspath(path)!r} has metadata nested deeper than {_MAX_DEPTH}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has version {meta.get('version')!r}; this mumoe reads "
            f"version {VERSION}"
        )
    return meta, tensors, handle


def _typed(value: Any, kind: type | tuple[type, ...], where: str, path: PathLike) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ValueError(f"{os.fspath(path)!r}: {where} must be {kind}, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        shown = repr(value) if len(repr(value)) < 80 else f"{type(value).__name__}"
        raise ValueError(f"{os.fspath(path)!r}: {where} must be {names}, got {shown}")
    return value


def _check_network_meta(meta: Any, where: str, path: PathLike) -> None:
    _typed(meta, dict, where, path)
    _typed(meta.get("spec"), str, f"{where} spec", path)
    dims = _typed(meta.get("expert_dims"), list, f"{where} expert_dims", path)
    if not 1 <= len(dims) <= _MAX_LEVELS:
        raise ValueError(f"{os.fspath(path)!r}: {where} has {len(dims)} expert levels")
    for d in dims:
        _typed(d, int, f"{where} expert_dims entry", path)
    for key in ("in_features", "out_features"):
        _typed(meta.get(key), int, f"{where} {key}", path)
    rank = meta.get("rank")
    if rank is not None:
        for bond, size in _typed(rank, dict, f"{where} rank", path).items():
            _typed(size, int, f"{where} rank of {bond!r}", path)
    _typed(meta.get("bias"), bool, f"{where} bias", path)
    for key in ("in_shape", "out_shape"):
        if meta.get(key) is not None:
            shape = _typed(meta[key], list, f"{where} {key}", path)
            if len(shape) > _MAX_LEVELS:
                raise ValueError(f"{os.fspath(path)!r}: {where} {key} has {len(shape)} legs")
            for size in shape:
                _typed(size, int, f"{where} {key} entry", path)


def _check_meta(meta: dict[str, Any], path: PathLike) -> None:
    """Types of every field the reader uses, before anything is built from them."""
    kind = meta.get("kind")
    if kind == "layer":
        _check_network_meta(meta, "the layer's network", path)
    elif kind == "block":
        _check_block_meta(meta, path)
    else:
        raise ValueError(f"{os.fspath(path)!r} holds a {kind!r}; mumoe reads layers and blocks")
    gate = meta.get("gate")
    if gate is not None:
        _typed(gate, dict, "gate", path)
        if gate.get("normalization") not in ("bn", "ln", None):
            raise ValueError(f"{os.fspath(path)!r}: unknown gate normalization")
        _typed(gate.get("activation"), str, "gate activation", path)
        _positive_float(gate.get("eps"), "gate eps", path)
        if gate.get("top_k") is not None and _typed(gate["top_k"], int, "gate top_k", path) < 1:
            raise ValueError(
                f"{os.fspath(path)!r}: gate top_k must be at least 1, got {gate['top_k']}"
            )
        if gate.get("bias") is not None:
            _typed(gate["bias"], bool, "gate bias", path)
    norm = meta.get("input_norm")
    if norm is not None:
        _positive_float(_typed(norm, dict, "input_norm", path).get("eps"), "input_norm eps", path)


#: A block's forms (:class:`mumoe.nn.MuMoEBlock`) and their values where a file omits them.
BLOCK_FORMS = {
    "encoder": "mumoe",
    "hidden_activation": "gelu",
    "glu": False,
    "output_bias": "experts",
}


def block_forms(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A block file's forms: encoder, hidden activation, glu and output bias.

    Parameters
    ----------
    meta : mapping
        The file's metadata (of a block).

    Returns
    -------
    dict
        :data:`BLOCK_FORMS` updated with the file's own.

    Examples
    --------
    >>> block_forms({"kind": "block", "glu": True})["glu"], block_forms({})["encoder"]
    (True, 'mumoe')
    """
    return {key: meta.get(key, default) for key, default in BLOCK_FORMS.items()}


def block_parts(meta: Mapping[str, Any]) -> list[str]:
    """The layers of a block file in order: ``fc1``, ``up`` (gated blocks), ``fc2``.

    Parameters
    ----------
    meta : mapping

    Returns
    -------
    list of str

    Examples
    --------
    >>> block_parts({"glu": True})
    ['fc1', 'up', 'fc2']
    """
    return ["fc1", "up", "fc2"] if block_forms(meta)["glu"] else ["fc1", "fc2"]


def _check_block_meta(meta: dict[str, Any], path: PathLike) -> None:
    forms = block_forms(meta)
    where = os.fspath(path)
    if forms["encoder"] not in ("mumoe", "linear"):
        raise ValueError(f"{where!r}: unknown block encoder {forms['encoder']!r}")
    if forms["output_bias"] not in ("experts", "shared"):
        raise ValueError(f"{where!r}: unknown block output_bias {forms['output_bias']!r}")
    _typed(forms["glu"], bool, "block glu", path)
    try:
        check_hidden_activation(forms["hidden_activation"])
    except ValueError as error:
        raise ValueError(f"{where!r}: {error}") from None
    parts = block_parts(meta)
    for part in parts:
        if part != "fc2" and forms["encoder"] == "linear":
            dense = _typed(meta.get(part), dict, f"the block's {part}", path)
            for key in ("in_features", "out_features"):
                _typed(dense.get(key), int, f"the block's {part} {key}", path)
            _typed(dense.get("bias"), bool, f"the block's {part} bias", path)
        else:
            _check_network_meta(meta.get(part), f"the block's {part}", path)
    unused = {"up"} - set(parts)
    if any(key in meta for key in unused):
        raise ValueError(f"{where!r}: the block has an 'up' layer but no glu")
    mumoe_parts = [p for p in parts if p == "fc2" or forms["encoder"] == "mumoe"]
    dims = {str(meta[p]["expert_dims"]) for p in mumoe_parts}
    if len(dims) > 1:
        described = ", ".join(f"{p} has expert_dims {meta[p]['expert_dims']}" for p in mumoe_parts)
        raise ValueError(
            f"{where!r}: the block's layers must have the same experts (one gate drives "
            f"them all): {described}"
        )
    hidden = meta["fc2"]["in_features"]
    for part in parts[:-1]:
        if meta[part]["in_features"] != meta["fc1"]["in_features"]:
            raise ValueError(f"{where!r}: the block's {part} reads another input than fc1")
        if meta[part]["out_features"] != hidden:
            raise ValueError(
                f"{where!r}: the block's {part} gives {meta[part]['out_features']} features "
                f"but fc2 takes {hidden}"
            )
    if forms["output_bias"] == "shared" and meta["fc2"]["bias"]:
        raise ValueError(
            f"{where!r}: a shared output bias replaces fc2's expert biases; fc2 has bias=True"
        )


def _positive_float(value: Any, where: str, path: PathLike) -> None:
    _typed(value, (int, float), where, path)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{os.fspath(path)!r}: {where} must be a positive number, got {value!r}")


#: The longest spec a file may hold: far above any real network (a Tucker spec with
#: ten levels is about 100 characters), and small enough that parsing is instant.
MAX_SPEC_LENGTH = 4096


def _network(meta: dict[str, Any], path: PathLike) -> Network:
    spec = meta.get("spec")
    if isinstance(spec, str) and len(spec) > MAX_SPEC_LENGTH:
        raise ValueError(
            f"{os.fspath(path)!r} holds a spec of {len(spec):,} characters; files hold specs "
            f"of at most {MAX_SPEC_LENGTH:,} (mumoe.inference.MAX_SPEC_LENGTH)"
        )
    try:
        return Network(
            meta["spec"],
            meta["in_features"],
            meta["out_features"],
            expert_dims=meta["expert_dims"],
            rank=meta["rank"] or None,
            bias=meta["bias"],
            in_shape=meta.get("in_shape"),
            out_shape=meta.get("out_shape"),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)!r} describes an invalid network: {error}") from error


def _expected(networks: dict[str, Network], meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, network in networks.items():
        shapes.update({f"{prefix}cores.{k}": s for k, s in enumerate(network.core_shapes)})
    layer = meta["kind"] == "layer"
    in_features = meta["in_features"] if layer else meta["fc1"]["in_features"]
    expert_dims = next(iter(networks.values())).expert_dims
    if not layer:
        forms = block_forms(meta)
        for part in block_parts(meta)[:-1]:
            if forms["encoder"] == "linear":
                shapes[f"{part}.weight"] = (meta[part]["out_features"], meta[part]["in_features"])
                if meta[part]["bias"]:
                    shapes[f"{part}.bias"] = (meta[part]["out_features"],)
        if forms["output_bias"] == "shared":
            shapes["bias"] = (meta["fc2"]["out_features"],)
    gate = meta.get("gate")
    if gate is not None:
        for e, n in enumerate(expert_dims):
            shapes[f"gate.projections.{e}"] = (in_features, n)
            if gate.get("bias"):
                shapes[f"gate.biases.{e}"] = (n,)
            if gate.get("normalization") == "bn":
                shapes[f"gate.running_mean.{e}"] = (n,)
                shapes[f"gate.running_var.{e}"] = (n,)
    if meta.get("input_norm") is not None:
        shapes["input_norm.weight"] = (in_features,)
        shapes["input_norm.bias"] = (in_features,)
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
    >>> import safetensors.numpy
    >>> path = os.path.join(tempfile.mkdtemp(), "other.safetensors")
    >>> safetensors.numpy.save_file({"x": np.zeros(2)}, path)  # not a mumoe file
    >>> read_checked(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: ...has no 'mumoe' description in its metadata
    """
    meta, tensors, handle = _read(path)
    with handle:  # the file's mapping is released on every exit
        return _checked(path, meta, tensors, handle)


def _checked(
    path: PathLike,
    meta: dict[str, Any],
    tensors: dict[str, Entry],
    handle: Any,
) -> tuple[dict[str, Any], dict[str, Network], dict[str, np.ndarray]]:
    _check_meta(meta, path)
    if meta["kind"] == "layer":
        networks = {"": _network(meta, path)}
        meta["spec"] = networks[""].spec  # canonical: the same network, however written
    else:
        dense = block_forms(meta)["encoder"] == "linear"
        networks = {}
        for part in block_parts(meta):
            if part == "fc2" or not dense:
                networks[f"{part}."] = _network(meta[part], path)
                meta[part]["spec"] = networks[f"{part}."].spec
    spec = " / ".join(network.spec for network in networks.values())
    expected = _expected(networks, meta)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{os.fspath(path)!r} does not match its spec {spec!r}: "
            f"missing entries {missing}, unexpected entries {extra}"
        )
    for name, shape in expected.items():
        dtype, found, _ = tensors[name]
        if found != shape:
            raise ValueError(
                f"{os.fspath(path)!r}: entry {name!r} must have shape {shape} for spec "
                f"{spec!r}, got {found}"
            )
        if dtype not in DTYPES:
            raise ValueError(
                f"{os.fspath(path)!r}: entry {name!r} must be floating point "
                f"({', '.join(DTYPES)}), got {dtype}"
            )
    core_dtypes = {tensors[name][0] for name in expected if "cores." in name}
    if len(core_dtypes) > 1:
        raise ValueError(
            f"{os.fspath(path)!r}: the cores must share one dtype, got {sorted(core_dtypes)}"
        )
    arrays = _read_arrays(path, {name: tensors[name] for name in expected})
    for name, array in arrays.items():
        if ".running_var." in name and not (array >= 0).all():  # NaN fails too
            raise ValueError(
                f"{os.fspath(path)!r}: entry {name!r} is a variance and must be non-negative, "
                f"got {array.min()!r}"
            )
    return meta, networks, arrays


#: safetensors' dtype names, as NumPy's (little-endian, by the format's specification).
_NUMPY_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def _read_arrays(path: PathLike, entries: Mapping[str, Entry]) -> dict[str, np.ndarray]:
    # Every check passed: only now are the arrays read, by plain reads rather than a
    # memory map, so that a file cut short meanwhile is an error, not a SIGBUS.
    arrays = {}
    try:
        with open(path, "rb") as f:
            for name, (dtype, shape, (begin, end)) in entries.items():
                array = np.empty(shape, dtype=_NUMPY_DTYPES[dtype])
                f.seek(begin)
                read = f.readinto(array.data.cast("B")) if array.nbytes else 0
                if read != array.nbytes or end - begin != array.nbytes:
                    raise ValueError(
                        f"entry {name!r} has {read:,} of its {array.nbytes:,} bytes; the file "
                        "is truncated (or was cut short while it was read)"
                    )
                arrays[name] = array
    except (OSError, ValueError) as error:
        raise _refuse(path, str(error)) from error
    return arrays


def check_values_fit(arrays: Mapping[str, np.ndarray], dtype: Any, path: PathLike) -> None:
    """Refuse to cast an array whose finite values the dtype cannot hold (they would be inf).

    Parameters
    ----------
    arrays : mapping of entry name to numpy.ndarray
    dtype : numpy, torch or other backend dtype
        The dtype the arrays are cast to.
    path : str or path-like
        Named in the message.

    Raises
    ------
    ValueError
        Naming the first entry, its largest magnitude and the dtype's.

    Examples
    --------
    >>> import numpy as np
    >>> check_values_fit({"cores.0": np.array([7e4])}, np.float16, "w.safetensors")
    Traceback (most recent call last):
    ...
    ValueError: 'w.safetensors': entry 'cores.0' holds 70000.0, beyond float16's largest ...
    """
    largest = _largest(dtype)
    if largest is None:
        return
    for name, array in arrays.items():
        finite = np.abs(array[np.isfinite(array)])
        if finite.size and float(finite.max()) > largest:
            raise ValueError(
                f"{os.fspath(path)!r}: entry {name!r} holds {float(finite.max())!r}, beyond "
                f"{_dtype_name(dtype)}'s largest value ({largest!r}); load it in a wider dtype"
            )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1].replace("<class '", "").rstrip("'>")


def _largest(dtype: Any) -> float | None:
    # The largest finite value of a floating dtype of any backend (None: not floating).
    name = _dtype_name(dtype)
    if name == "bfloat16":
        return float(np.finfo(np.float32).max) * (1 - 2.0**-8)
    try:
        return float(np.finfo(np.dtype(name)).max)
    except (TypeError, ValueError):
        return None


def load(path: PathLike, *, dtype: Any = None) -> InferenceMuMoE | InferenceMuMoEBlock:
    """Read a weights file (:func:`mumoe.nn.save`) onto the active TensorLy backend.

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
    >>> net = cp(3, 2, expert_dims=4, rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> arrays = {f"cores.{k}": np.ones(s) for k, s in enumerate(net.core_shapes)}
    >>> write(path, {"kind": "layer", **network_meta(net), "gate": None, "input_norm": None},
    ...       arrays)
    >>> layer = load(path, dtype=np.float32)
    >>> layer(np.ones((5, 3), dtype=np.float32), [np.ones((5, 4), dtype=np.float32)]).shape
    (5, 2)
    """
    meta, networks, arrays = read_checked(path)
    kind = meta["kind"]

    if dtype is not None:
        check_values_fit(arrays, dtype, path)

    def tensor(name: str) -> Tensor:
        array = arrays[name]
        return tl.tensor(array) if dtype is None else tl.tensor(array, dtype=dtype)

    def cores(prefix: str) -> list[Tensor]:
        return [tensor(f"{prefix}cores.{k}") for k in range(networks[prefix].n_cores)]

    gate = meta.get("gate")
    first = next(iter(networks.values()))  # the layer's, or the block's first μMoE layer
    levels = range(first.n_levels)
    bn = gate is not None and gate["normalization"] == "bn"
    biased = gate is not None and bool(gate.get("bias"))
    gate_options: dict[str, Any] = {
        "projections": None if gate is None else [tensor(f"gate.projections.{e}") for e in levels],
        "biases": [tensor(f"gate.biases.{e}") for e in levels] if biased else None,
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
    forms = block_forms(meta)

    def layer(part: str) -> InferenceMuMoE | InferenceLinear:
        prefix = f"{part}."
        if prefix not in networks:  # a dense encoder
            bias = tensor(f"{prefix}bias") if meta[part]["bias"] else None
            return InferenceLinear(tensor(f"{prefix}weight"), bias)
        return decoder(part)

    def decoder(part: str) -> InferenceMuMoE:
        # The first μMoE layer holds the block's gate (it reads the block's input).
        network = networks[f"{part}."]
        options = gate_options if network is first else {"projections": None}
        return InferenceMuMoE(network, cores(f"{part}."), **options)

    return InferenceMuMoEBlock(
        layer("fc1"),
        decoder("fc2"),
        up=layer("up") if forms["glu"] else None,
        hidden_activation=forms["hidden_activation"],
        output_bias=tensor("bias") if forms["output_bias"] == "shared" else None,
        input_norm_affine=input_norm,
        input_eps=input_eps,
    )
