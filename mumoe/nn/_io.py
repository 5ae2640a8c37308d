"""Portable weights from and into PyTorch modules: :func:`save` and :func:`load_into`.

A :class:`~mumoe.nn.MuMoE` or :class:`~mumoe.nn.MuMoEBlock` is described
(:func:`module_entries`) as a weights file's metadata and tensors, written with
:func:`mumoe.inference.write`, and read back, all or nothing, with
:func:`mumoe.inference.read_checked`; :func:`mumoe.inference.load` serves the
same file on any backend, without torch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from mumoe.gates import ACTIVATIONS
from mumoe.inference import BLOCK_FORMS, check_values_fit, network_meta, read_checked, write
from mumoe.nn._block import MuMoEBlock
from mumoe.nn._gate import builtin_name
from mumoe.nn._layers import MuMoE
from mumoe.typing import PathLike

__all__ = ["load_into", "module_entries", "save"]

#: The metadata a file and a module must agree on before load_into writes anything.
_COMPARED = (
    "kind",
    "spec",
    "expert_dims",
    "in_features",
    "out_features",
    "rank",
    "bias",
    "encoder",
    "hidden_activation",
    "glu",
    "output_bias",
    "fc1",
    "up",
    "fc2",
    "gate",
    "input_norm",
)


def _networks_only(meta: Any) -> Any:
    # network_format is derived from the spec: not compared (older files wrote "custom").
    if isinstance(meta, dict):
        return {k: v for k, v in meta.items() if k != "network_format"}
    return meta


def module_entries(module: MuMoE | MuMoEBlock) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The file metadata of a torch layer or block, and its tensors by file entry name.

    Parameters
    ----------
    module : MuMoE or MuMoEBlock

    Returns
    -------
    meta : dict
    tensors : dict of str to torch.Tensor
        The module's own parameters and buffers (not copies).

    Raises
    ------
    TypeError
        If ``module`` is neither.
    ValueError
        If its gate uses a custom activation callable.

    Examples
    --------
    >>> from mumoe.nn import CPMuMoE
    >>> meta, tensors = module_entries(CPMuMoE(8, 4, expert_dims=6, rank=2))
    >>> meta["kind"], sorted(tensors)[:2]
    ('layer', ['cores.0', 'cores.1'])
    """
    meta: dict[str, Any] = {}
    if isinstance(module, MuMoE):
        meta["kind"] = "layer"
        meta.update(network_meta(module.network))
        layers = {"": module}
    elif isinstance(module, MuMoEBlock):
        meta["kind"] = "block"
        # The forms only where they differ from the μMoE paper's block, so files of
        # such blocks stay as they were.
        forms = {
            "encoder": (module.encoder, "mumoe"),
            "hidden_activation": (module.hidden_activation, "gelu"),
            "glu": (module.glu, False),
            "output_bias": (module.output_bias, "experts"),
        }
        meta.update({key: value for key, (value, default) in forms.items() if value != default})
        parts = {"fc1": module.fc1, "up": module.up, "fc2": module.fc2}
        layers = {}
        for name, part in parts.items():
            if isinstance(part, MuMoE):
                meta[name] = network_meta(part.network)
                layers[f"{name}."] = part
            elif isinstance(part, torch.nn.Linear):
                meta[name] = {
                    "in_features": part.in_features,
                    "out_features": part.out_features,
                    "bias": part.bias is not None,
                }
    else:
        raise TypeError(
            "save and load_into take a mumoe.nn.MuMoE or MuMoEBlock, "
            f"got {type(module).__qualname__}"
        )
    tensors: dict[str, Any] = {}
    for prefix, layer in layers.items():
        if layer._modules.get("bond_regularizer") is not None:
            raise ValueError(
                f"the {prefix.rstrip('.') or 'layer'} has a bond regularizer, a training "
                "setting a weights file does not hold: prune_bonds folds it into the cores"
            )
        for k, core in enumerate(layer._weights()[1]):
            tensors[f"{prefix}cores.{k}"] = core
    if isinstance(module, MuMoEBlock):
        for name in ("fc1", "up"):
            dense = getattr(module, name)
            if isinstance(dense, torch.nn.Linear):
                tensors[f"{name}.weight"] = dense.weight
                if dense.bias is not None:
                    tensors[f"{name}.bias"] = dense.bias
        if module.bias is not None:
            tensors["bias"] = module.bias

    meta["gate"] = None
    if module.gate is not None:
        gate = module.gate
        if builtin_name(gate.activation) != gate.activation_name:
            raise ValueError(
                f"the gate's activation {gate.activation_name!r} is a custom callable and "
                f"cannot be saved; portable layers use one of {', '.join(map(repr, ACTIVATIONS))}"
                " (given by name)"
            )
        expected = {"bn": torch.nn.BatchNorm1d, "ln": torch.nn.LayerNorm, None: torch.nn.Identity}
        for e, norm in enumerate(gate.norms):
            kind = expected[gate.normalization]
            if (
                type(norm) is not kind
                or getattr(norm, "affine", False)
                or getattr(norm, "elementwise_affine", False)
            ):
                raise ValueError(
                    f"the gate's norm {e} is {norm!r}, not the {kind.__name__} without affine "
                    f"parameters of normalization={gate.normalization!r}; it cannot be saved"
                )
        eps = 1e-5
        for e, projection in enumerate(gate.projections):
            tensors[f"gate.projections.{e}"] = projection
        for e, bias in enumerate(gate.biases or ()):
            tensors[f"gate.biases.{e}"] = bias
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
            # top_k only where set, so files of other gates stay as they were
            **({} if gate.top_k is None else {"top_k": gate.top_k}),
            **({} if gate.biases is None else {"bias": True}),  # likewise
            "eps": float(eps),
        }
    meta["input_norm"] = None
    if module.input_norm is not None:
        tensors["input_norm.weight"] = module.input_norm.weight
        tensors["input_norm.bias"] = module.input_norm.bias
        meta["input_norm"] = {"eps": float(module.input_norm.eps)}
    return meta, tensors


def save(module: MuMoE | MuMoEBlock, path: PathLike) -> None:
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
    >>> from mumoe.inference import load
    >>> from mumoe.nn import CPMuMoE
    >>> path = os.path.join(tempfile.mkdtemp(), "head.safetensors")
    >>> save(CPMuMoE(16, 4, expert_dims=8, rank=3).eval(), path)
    >>> served = load(path)
    >>> served.network, served.activation
    (Network('n1 r, i r, o r', 16, 4, expert_dims=8, rank={'r': 3}, bias=True), 'entmax15')
    """
    meta, tensors = module_entries(module)
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if tensor is None:  # batch norm built without running statistics
            raise ValueError("the gate's batch norm tracks no running statistics to save")
        host = tensor.detach().cpu()
        if host.dtype == torch.bfloat16:  # NumPy has no bfloat16: widen, exactly
            host = host.float()
        arrays[name] = host.numpy()
    write(path, meta, arrays)


def _check_writable(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    # Before anything is written: a copy that would fail half-way must not start.
    for name, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(
                f"the module is on the meta device (its {name!r} has no storage), so nothing "
                "can be loaded into it; materialise it first: module.to_empty(device='cpu')"
            )
        if tensor.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(
                f"the module's {name!r} is an inference tensor (the module was built, or "
                "moved, under torch.inference_mode), which cannot be written outside that "
                "mode; build the module outside it, or call load_into under inference_mode"
            )


def load_into(module: MuMoE | MuMoEBlock, path: PathLike) -> None:
    """Read a file written by :func:`save` into a torch layer or block, all or nothing.

    Everything is checked before anything is written: the file itself (as
    :func:`load` checks it), and that it describes ``module`` — the same kind
    (layer or block), networks, gate (normalisation, activation, top_k, eps) and
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
    >>> path = os.path.join(tempfile.mkdtemp(), "layer.safetensors")
    >>> trained = TRMuMoE(8, 4, expert_dims=6, rank=(2, 2, 3)).eval()
    >>> save(trained, path)
    >>> fresh = TRMuMoE(8, 4, expert_dims=6, rank=(2, 2, 3)).eval()
    >>> load_into(fresh, path)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(fresh(x), trained(x))
    True
    """
    meta, _, arrays = read_checked(path)
    own, tensors = module_entries(module)
    layers = [module] if isinstance(module, MuMoE) else module.mumoe_layers
    if not all(layer._owns_cores for layer in layers):
        raise TypeError(
            f"{type(module).__qualname__} takes its cores from elsewhere; load_into writes "
            "the cores of a MuMoE or MuMoEBlock"
        )
    if meta.get("kind") == "block" == own.get("kind"):  # forms a file omits are the defaults
        meta, own = {**BLOCK_FORMS, **meta}, {**BLOCK_FORMS, **own}
    for key in _COMPARED:
        if _networks_only(meta.get(key)) != _networks_only(own.get(key)):
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
    _check_writable(module, tensors)
    for name, tensor in tensors.items():
        check_values_fit({name: arrays[name]}, tensor.dtype, path)
    # Convert every entry before writing any: a failure leaves the module untouched.
    values = {
        name: torch.from_numpy(np.ascontiguousarray(arrays[name])).to(tensor.device, tensor.dtype)
        for name, tensor in tensors.items()
    }
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(values[name])
