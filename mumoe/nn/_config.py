"""The pieces of a μMoE module's configuration: networks, gates, sizes and dtypes as JSON.

A layer's or block's ``get_config()`` writes its constructor settings from its
current state with these helpers, and its ``from_config`` reads them back
with the checks here: every field present, of its type, valid, and no field
unknown, each failure a ``ValueError`` that names the field and what came.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mumoe.gates import ACTIVATIONS, LOSSES
from mumoe.inference import network_meta
from mumoe.nn._gate import MuMoEGate, builtin_name
from mumoe.spec import Network

__all__ = [
    "DTYPES",
    "config_dtype",
    "config_error",
    "config_field",
    "config_size",
    "dtype_name",
    "gate_config",
    "gate_options",
    "known_fields",
    "layer_config",
    "network_config",
    "network_from_config",
]

#: The parameter dtypes a configuration may name.
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

_NORMS = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm, None: nn.Identity}


def network_config(network: Network) -> dict[str, Any]:
    """A network as JSON: spec, expert_dims, rank, bias.

    Parameters
    ----------
    network : Network

    Returns
    -------
    dict

    Examples
    --------
    >>> from mumoe import cp
    >>> network_config(cp(4, 2, expert_dims=8, rank=3))
    {'spec': 'n1 r, i r, o r', 'expert_dims': [8], 'rank': {'r': 3}, 'bias': True}
    """
    meta = network_meta(network)  # a weights file's, less the sizes the owner holds
    keys = ("spec", "expert_dims", "rank", "bias", "in_shape", "out_shape")
    return {key: meta[key] for key in keys if key in meta}


def gate_config(gate: MuMoEGate, owner: str) -> dict[str, Any]:
    """A gate's constructor settings as JSON.

    Parameters
    ----------
    gate : MuMoEGate
    owner : str
        Named in messages.

    Returns
    -------
    dict
        normalization, activation, top_k, bias, balance.

    Raises
    ------
    ValueError
        For a custom activation callable, or a norm the constructor does not
        build (code and replaced modules are not configuration).

    Examples
    --------
    >>> gate_config(MuMoEGate(4, (3,), activation="softmax"), "layer")["activation"]
    'softmax'
    """
    if builtin_name(gate.activation) != gate.activation_name:
        raise ValueError(
            f"the {owner}'s gate activation {gate.activation_name!r} is a custom callable, "
            f"which a configuration cannot hold (code is not saved); use one of "
            f"{', '.join(map(repr, ACTIVATIONS))}"
        )
    kind = _NORMS[gate.normalization]
    for e, norm in enumerate(gate.norms):
        default_eps = getattr(kind(1), "eps", None) if kind is not nn.Identity else None
        if (
            type(norm) is not kind
            or getattr(norm, "affine", False)
            or getattr(norm, "elementwise_affine", False)
            or getattr(norm, "eps", None) != default_eps
        ):
            raise ValueError(
                f"the {owner}'s gate norm {e} is {norm!r}, not the {kind.__name__} of "
                f"normalization={gate.normalization!r} the constructor builds; a configuration "
                "cannot hold it"
            )
    return {
        "normalization": gate.normalization,
        "activation": gate.activation_name,
        "top_k": gate.top_k,
        "bias": gate.biases is not None,
        "balance": dict(gate.balance),
    }


def layer_config(layer: Any, name: str) -> dict[str, Any]:
    """A μMoE layer's configuration (its ``get_config()``), under the class name ``name``.

    Parameters
    ----------
    layer : MuMoE
        Whose cores are its own.
    name : str

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        For a layer with a bond regularizer (:func:`mumoe.nn.regularize_bonds`).

    Examples
    --------
    >>> from mumoe.nn import CPMuMoE
    >>> sorted(layer_config(CPMuMoE(4, 2, expert_dims=3, rank=2), "CPMuMoE"))[:3]
    ['class', 'dtype', 'gate']
    """
    if layer._modules.get("bond_regularizer") is not None:
        raise ValueError(
            f"the {name} has a bond regularizer, a training setting a configuration does not "
            "hold: prune_bonds(layer, ...) folds its weights into the cores and removes it"
        )
    return {
        "class": name,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "network": network_config(layer.network),
        "gate": None if layer.gate is None else gate_config(layer.gate, name),
        "input_norm": layer.input_norm is not None,
        "dtype": dtype_name(layer.cores[0]),
    }


def dtype_name(tensor: torch.Tensor) -> str:
    """``"float32"`` for a float32 tensor, and so on.

    Parameters
    ----------
    tensor : torch.Tensor

    Returns
    -------
    str

    Examples
    --------
    >>> dtype_name(torch.zeros(1, dtype=torch.bfloat16))
    'bfloat16'
    """
    return str(tensor.dtype).removeprefix("torch.")


def config_error(where: str, message: str) -> ValueError:
    """The error of a configuration: ``"configuration {where}: {message}"``.

    Parameters
    ----------
    where, message : str

    Returns
    -------
    ValueError

    Examples
    --------
    >>> config_error("of 'fc'", "has no 'class'")
    ValueError("configuration of 'fc': has no 'class'")
    """
    return ValueError(f"configuration {where}: {message}")


def config_field(config: Mapping[str, Any], key: str, kinds: Any, where: str) -> Any:
    """The field ``key`` of ``config``, checked to be of ``kinds`` (a bool is not an int).

    Parameters
    ----------
    config : mapping
    key : str
    kinds : type or tuple of types
    where : str
        Named in messages.

    Returns
    -------
    Any

    Raises
    ------
    ValueError
        If the field is missing or of another type.

    Examples
    --------
    >>> config_field({"in_features": True}, "in_features", int, "of a layer")
    Traceback (most recent call last):
    ...
    ValueError: configuration of a layer: 'in_features' is True, expected <class 'int'>
    """
    if key not in config:
        raise config_error(where, f"has no {key!r}")
    value = config[key]
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in allowed):
        raise config_error(where, f"{key!r} is {value!r}, expected {kinds}")
    return value


def known_fields(config: Any, keys: set[str], where: str) -> None:
    """Check that ``config`` is a mapping with no field outside ``keys``.

    Parameters
    ----------
    config : Any
    keys : set of str
    where : str

    Raises
    ------
    ValueError
        If it is not a mapping, or has an unknown field (a newer mumoe's).

    Examples
    --------
    >>> known_fields({"a": 1, "b": 2}, {"a"}, "of x")
    Traceback (most recent call last):
    ...
    ValueError: configuration of x: has unknown fields ['b'] (a newer mumoe's?); expected ['a']
    """
    if not isinstance(config, Mapping):
        raise config_error(where, f"is {type(config).__name__}, expected a JSON object")
    unknown = sorted(set(config) - keys)
    if unknown:
        raise config_error(
            where, f"has unknown fields {unknown} (a newer mumoe's?); expected {sorted(keys)}"
        )


def config_size(config: Mapping[str, Any], key: str, where: str) -> int:
    """A positive int field.

    Parameters
    ----------
    config : mapping
    key, where : str

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If missing, not an int, or below 1.

    Examples
    --------
    >>> config_size({"in_features": 8}, "in_features", "of a layer")
    8
    """
    value = config_field(config, key, int, where)
    if value < 1:
        raise config_error(where, f"{key!r} is {value}, expected a positive int")
    return int(value)


def config_dtype(config: Mapping[str, Any], where: str) -> torch.dtype:
    """The ``dtype`` field as a torch dtype.

    Parameters
    ----------
    config : mapping
    where : str

    Returns
    -------
    torch.dtype

    Raises
    ------
    ValueError
        If it is not one of :data:`DTYPES`.

    Examples
    --------
    >>> config_dtype({"dtype": "float64"}, "of a layer")
    torch.float64
    """
    name = config_field(config, "dtype", str, where)
    if name not in DTYPES:
        raise config_error(where, f"dtype {name!r} is not one of {list(DTYPES)}")
    return DTYPES[name]


def network_from_config(config: Any, in_features: int, out_features: int, where: str) -> Network:
    """The Network a :func:`network_config` describes, for the given sizes.

    Parameters
    ----------
    config : Any
        Read from JSON.
    in_features, out_features : int
    where : str

    Returns
    -------
    Network

    Raises
    ------
    ValueError
        For a missing, unknown or mistyped field, or a network that does not
        build (a spec that does not parse, ranks that do not fit it).

    Examples
    --------
    >>> from mumoe import cp
    >>> network_from_config(network_config(cp(4, 2, expert_dims=8, rank=3)), 4, 2, "") == cp(
    ...     4, 2, expert_dims=8, rank=3)
    True
    """
    known_fields(config, {"spec", "expert_dims", "rank", "bias", "in_shape", "out_shape"}, where)
    dims = config_field(config, "expert_dims", list, where)
    rank = config_field(config, "rank", dict, where)
    shapes = {
        name: tuple(config_field(config, name, list, where))
        for name in ("in_shape", "out_shape")
        if name in config
    }
    try:
        return Network(
            config_field(config, "spec", str, where),
            in_features,
            out_features,
            expert_dims=tuple(dims),
            rank=rank or None,
            bias=config_field(config, "bias", bool, where),
            **shapes,
        )
    except (TypeError, ValueError) as error:
        raise config_error(where, f"its network is invalid: {error}") from error


def gate_options(config: Any, where: str) -> dict[str, Any]:
    """The layer keyword arguments a :func:`gate_config` describes.

    Parameters
    ----------
    config : Any
        Read from JSON.
    where : str

    Returns
    -------
    dict
        normalization, activation, top_k, gate_bias, balance.

    Raises
    ------
    ValueError
        For a missing, unknown, mistyped or invalid field.

    Examples
    --------
    >>> gate_options(gate_config(MuMoEGate(4, (3,)), "layer"), "")["activation"]
    'entmax15'
    """
    known_fields(config, {"normalization", "activation", "top_k", "bias", "balance"}, where)
    normalization = config.get("normalization")
    if normalization not in _NORMS:
        raise config_error(where, f"normalization {normalization!r} is not one of {list(_NORMS)}")
    activation = config_field(config, "activation", str, where)
    if activation not in ACTIVATIONS:
        raise config_error(where, f"activation {activation!r} is not one of {list(ACTIVATIONS)}")
    top_k = config.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise config_error(where, f"top_k is {top_k!r}, expected an int or null")
    balance = config_field(config, "balance", dict, where)
    unknown = sorted(set(balance) - set(LOSSES))
    if unknown or not all(isinstance(v, int | float) for v in balance.values()):
        raise config_error(
            where, f"balance {balance!r} is not {{loss: coefficient}} over {list(LOSSES)}"
        )
    return {
        "normalization": normalization,
        "activation": activation,
        "top_k": top_k,
        "gate_bias": config_field(config, "bias", bool, where),
        "balance": balance or None,
    }
