"""The constructor settings of a μMoE layer or block, as JSON, and the module they build.

:func:`module_config` reads the settings from a module's current state (its
networks, gate and forms, so a layer whose experts were removed is described
as it is now), and :func:`module_from_config` builds a fresh module of the
same class and shapes from them, checking every field first.  Whole-model
manifests (:func:`mumoe.nn.save_model`) and the hub layout
(``save_pretrained``) hold these settings; the values travel in safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mumoe.gates import ACTIVATIONS, HIDDEN_ACTIVATIONS, LOSSES
from mumoe.nn._block import ENCODERS, OUTPUT_BIASES, MuMoEBlock
from mumoe.nn._gate import MuMoEGate, builtin_name
from mumoe.nn._layers import CPMuMoE, MuMoE, TRMuMoE, TTMuMoE, TuckerMuMoE
from mumoe.spec import Network

__all__ = ["DTYPES", "LAYER_CLASSES", "module_config", "module_from_config"]

#: The classes a configuration may name, by name.
LAYER_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (MuMoE, CPMuMoE, TuckerMuMoE, TTMuMoE, TRMuMoE, MuMoEBlock)
}

#: The parameter dtypes a configuration may name.
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

_NORMS = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm, None: nn.Identity}
_BLOCK_PARTS = ("fc1", "up", "fc2")


def _network_config(network: Network) -> dict[str, Any]:
    return {
        "spec": network.spec,
        "expert_dims": list(network.expert_dims),
        "rank": dict(network.ranks),
        "bias": network.bias,
    }


def _gate_config(gate: MuMoEGate, owner: str) -> dict[str, Any]:
    if builtin_name(gate.activation) != gate.activation_name:
        raise ValueError(
            f"the {owner}'s gate activation {gate.activation_name!r} is a custom callable, "
            f"which a configuration cannot hold (code is not saved); use one of "
            f"{', '.join(map(repr, ACTIVATIONS))}"
        )
    kind = _NORMS[gate.normalization]
    for e, norm in enumerate(gate.norms):
        default = kind(1) if kind is not nn.Identity else norm
        if (
            type(norm) is not kind
            or getattr(norm, "affine", False)
            or getattr(norm, "elementwise_affine", False)
            or getattr(norm, "eps", None) != getattr(default, "eps", None)
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


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def module_config(module: nn.Module) -> dict[str, Any]:
    """The JSON-ready constructor settings of a μMoE layer or block, from its current state.

    Parameters
    ----------
    module : MuMoE (or a preset subclass) or MuMoEBlock
        Whose cores are its own parameters, with a gate of a named activation.

    Returns
    -------
    dict
        ``class``, the sizes, each μMoE layer's network (spec, expert_dims,
        rank, bias), the gate (normalisation, activation, top_k, bias,
        balance), the input norm, the block's forms and the parameters'
        ``dtype``; :func:`module_from_config` builds the module back.

    Raises
    ------
    TypeError
        For another module, a subclass of its own, or a layer whose cores live
        elsewhere (:class:`mumoe.nn.FactorizedMuMoE`).
    ValueError
        For a custom activation callable or a gate norm the constructor does
        not build.

    Examples
    --------
    >>> from mumoe.nn import CPMuMoE
    >>> config = module_config(CPMuMoE(8, 4, expert_dims=6, rank=2))
    >>> config["class"], config["network"]["rank"], config["gate"]["activation"]
    ('CPMuMoE', {'r': 2}, 'entmax15')
    """
    name = type(module).__name__
    if LAYER_CLASSES.get(name) is not type(module):
        raise TypeError(
            f"a configuration describes one of {', '.join(LAYER_CLASSES)}, got "
            f"{type(module).__module__}.{type(module).__qualname__}"
        )
    if isinstance(module, MuMoE):
        if not module._owns_cores:
            raise TypeError(
                f"{name} takes its cores from elsewhere; a configuration cannot hold it"
            )
        return {
            "class": name,
            "in_features": module.in_features,
            "out_features": module.out_features,
            "network": _network_config(module.network),
            "gate": None if module.gate is None else _gate_config(module.gate, name),
            "input_norm": module.input_norm is not None,
            "dtype": _dtype_name(module.cores[0]),
        }
    assert isinstance(module, MuMoEBlock)
    networks = {
        part: _network_config(layer.network) if isinstance(layer, MuMoE) else None
        for part in _BLOCK_PARTS
        for layer in [getattr(module, part)]
    }
    return {
        "class": name,
        "in_features": module.in_features,
        "hidden_features": module.hidden_features,
        "out_features": module.out_features,
        "bias": module.fc2.network.bias or module.bias is not None,
        "encoder": module.encoder,
        "hidden_activation": module.hidden_activation,
        "glu": module.glu,
        "output_bias": module.output_bias,
        "networks": networks,
        "gate": _gate_config(module.gate, name),
        "input_norm": module.input_norm is not None,
        "dtype": _dtype_name(module.fc2.cores[0]),
    }


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"configuration {where}: {message}")


def _get(config: Mapping[str, Any], key: str, kinds: Any, where: str) -> Any:
    if key not in config:
        raise _fail(where, f"has no {key!r}")
    value = config[key]
    bad_bool = isinstance(value, bool) and bool not in (
        kinds if isinstance(kinds, tuple) else (kinds,)
    )
    if not isinstance(value, kinds) or bad_bool:
        raise _fail(where, f"{key!r} is {value!r}, expected {kinds}")
    return value


def _known(config: Mapping[str, Any], keys: set[str], where: str) -> None:
    if not isinstance(config, Mapping):
        raise _fail(where, f"is {type(config).__name__}, expected a JSON object")
    unknown = sorted(set(config) - keys)
    if unknown:
        raise _fail(
            where, f"has unknown fields {unknown} (a newer mumoe's?); expected {sorted(keys)}"
        )


def _network(config: Any, in_features: int, out_features: int, where: str) -> Network:
    _known(config, {"spec", "expert_dims", "rank", "bias"}, where)
    dims = _get(config, "expert_dims", list, where)
    rank = _get(config, "rank", dict, where)
    try:
        return Network(
            _get(config, "spec", str, where),
            in_features,
            out_features,
            expert_dims=tuple(dims),
            rank=rank or None,
            bias=_get(config, "bias", bool, where),
        )
    except (TypeError, ValueError) as error:
        raise _fail(where, f"its network is invalid: {error}") from error


def _gate_options(config: Any, where: str) -> dict[str, Any]:
    _known(config, {"normalization", "activation", "top_k", "bias", "balance"}, where)
    normalization = config.get("normalization")
    if normalization not in _NORMS:
        raise _fail(where, f"normalization {normalization!r} is not one of {list(_NORMS)}")
    activation = _get(config, "activation", str, where)
    if activation not in ACTIVATIONS:
        raise _fail(where, f"activation {activation!r} is not one of {list(ACTIVATIONS)}")
    top_k = config.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise _fail(where, f"top_k is {top_k!r}, expected an int or null")
    balance = _get(config, "balance", dict, where)
    unknown = sorted(set(balance) - set(LOSSES))
    if unknown or not all(isinstance(v, int | float) for v in balance.values()):
        raise _fail(where, f"balance {balance!r} is not {{loss: coefficient}} over {list(LOSSES)}")
    return {
        "normalization": normalization,
        "activation": activation,
        "top_k": top_k,
        "gate_bias": _get(config, "bias", bool, where),
        "balance": balance or None,
    }


def _size(config: Mapping[str, Any], key: str, where: str) -> int:
    value = _get(config, key, int, where)
    if value < 1:
        raise _fail(where, f"{key!r} is {value}, expected a positive int")
    return int(value)


def module_from_config(
    config: Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    where: str = "",
) -> MuMoE | MuMoEBlock:
    """A freshly initialised module of the class and shapes ``config`` describes.

    Parameters
    ----------
    config : mapping
        As :func:`module_config` returns it (read from JSON).
    device : torch.device or str, optional
    dtype : torch.dtype, optional
        Of the parameters; by default the configuration's.
    where : str, optional
        Named in error messages (the file, the module's name).

    Returns
    -------
    MuMoE or MuMoEBlock
        In train mode, initialised as its constructor does.

    Raises
    ------
    ValueError
        If a field is missing, unknown, of the wrong type, or invalid (an
        unknown class, a spec that does not parse, sizes that disagree); the
        message names the field.

    Examples
    --------
    >>> from mumoe.nn import MuMoEBlock
    >>> block = MuMoEBlock(8, 32, expert_dims=4, rank=3, glu=True, hidden_activation="silu")
    >>> rebuilt = module_from_config(module_config(block))
    >>> type(rebuilt).__name__, rebuilt.up.network == block.up.network
    ('MuMoEBlock', True)
    """
    where = where or "of a μMoE module"
    if not isinstance(config, Mapping):
        raise _fail(where, f"is {type(config).__name__}, expected a JSON object")
    name = _get(config, "class", str, where)
    cls = LAYER_CLASSES.get(name)
    if cls is None:
        raise _fail(where, f"class {name!r} is not one of {list(LAYER_CLASSES)}")
    dtype_name = _get(config, "dtype", str, where)
    if dtype_name not in DTYPES:
        raise _fail(where, f"dtype {dtype_name!r} is not one of {list(DTYPES)}")
    factory: dict[str, Any] = {"device": device, "dtype": dtype or DTYPES[dtype_name]}
    in_features = _size(config, "in_features", where)
    out_features = _size(config, "out_features", where)
    input_norm = _get(config, "input_norm", bool, where)
    try:
        if cls is not MuMoEBlock:
            _known(
                config,
                {"class", "in_features", "out_features", "network", "gate", "input_norm", "dtype"},
                where,
            )
            network = _network(
                config.get("network"), in_features, out_features, f"{where}, network"
            )
            gate = config.get("gate")
            options = {} if gate is None else _gate_options(gate, f"{where}, gate")
            layer = cls.__new__(cls)
            # A preset class's own __init__ takes a format's rank; the network is exact.
            MuMoE.__init__(
                layer,  # type: ignore[arg-type]
                in_features,
                out_features,
                network,
                bias=network.bias,
                input_norm=input_norm,
                gated=gate is not None,
                **options,
                **factory,
            )
            return layer  # type: ignore[return-value]
        keys = {
            "class", "in_features", "hidden_features", "out_features", "bias", "encoder",
            "hidden_activation", "glu", "output_bias", "networks", "gate", "input_norm", "dtype",
        }  # fmt: skip
        _known(config, keys, where)
        hidden = _size(config, "hidden_features", where)
        networks = _get(config, "networks", dict, where)
        _known(networks, set(_BLOCK_PARTS), f"{where}, networks")
        encoder = config.get("encoder")
        if encoder not in ENCODERS or config.get("output_bias") not in OUTPUT_BIASES:
            raise _fail(
                where, f"encoder/output_bias {encoder!r}/{config.get('output_bias')!r} unknown"
            )
        if config.get("hidden_activation") not in HIDDEN_ACTIVATIONS:
            raise _fail(where, f"hidden_activation {config.get('hidden_activation')!r} unknown")
        sizes = {
            "fc1": (in_features, hidden),
            "up": (in_features, hidden),
            "fc2": (hidden, out_features),
        }
        built = {
            part: _network(networks[part], *sizes[part], f"{where}, networks.{part}")
            for part in _BLOCK_PARTS
            if networks.get(part) is not None
        }
        if "fc2" not in built:
            raise _fail(where, "networks.fc2 is missing: a block's decoder is a μMoE layer")
        decoder = built["fc2"]
        block = MuMoEBlock(
            in_features,
            hidden,
            out_features,
            decoder.spec,
            expert_dims=decoder.expert_dims,
            rank=dict(decoder.ranks) or None,
            bias=_get(config, "bias", bool, where),
            encoder=encoder,
            hidden_activation=config["hidden_activation"],
            glu=_get(config, "glu", bool, where),
            output_bias=config["output_bias"],
            input_norm=input_norm,
            **_gate_options(config.get("gate"), f"{where}, gate"),
            **factory,
        )
        # The encoders' ranks may differ from the decoder's (a budget matched per layer).
        for part, network in built.items():
            layer = getattr(block, part)
            if not isinstance(layer, MuMoE) or layer.network.expert_dims != network.expert_dims:
                raise _fail(where, f"networks.{part} does not fit the block's encoder {encoder!r}")
            if layer.network != network:
                setattr(
                    block,
                    part,
                    MuMoE(*sizes[part], network, bias=network.bias, gated=False, **factory),
                )
        return block
    except (TypeError, ValueError) as error:
        if str(error).startswith("configuration "):
            raise
        raise _fail(where, str(error)) from error
