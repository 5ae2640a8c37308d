"""From pretrained models: dense layers of any PyTorch model into μMoE layers.

:func:`from_linear` turns one ``nn.Linear`` (or the ``Conv1D`` of ``transformers``' GPT-2, a
linear layer with its weight transposed) into a :class:`~mumoe.nn.MuMoE`
whose every expert starts as the linear layer, exactly where the network can
hold it and as its best rank-k approximation otherwise
(:mod:`mumoe.functional`).  :func:`replace_linear` does it in place for
every linear layer of a model that a filter selects, all or nothing.

The gate starts at random (``N(0, 1/I)`` projections) rather than at zero:
with every expert equal, a zero gate would give every expert the same
gradient forever; a random one gives each token its own mix of experts from
the first step, and the layer's output is still the linear layer's, since
the coefficients of each level sum to one.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mumoe.functional import cores_from_dense, dense_matrix, relative_error
from mumoe.nn._block import MuMoEBlock
from mumoe.nn._layers import MuMoE
from mumoe.spec import Network
from mumoe.typing import RankOrBudget

__all__ = [
    "block_from_mlp",
    "from_linear",
    "linear_weights",
    "replace_linear",
    "replaced_record",
]

Include = Callable[[str, nn.Module], bool] | str

#: Keyword arguments a conversion sets itself, from the linear layer.
_FROM_LINEAR = ("bias", "device", "dtype")


def replaced_record(module: nn.Module) -> dict[str, Any]:
    """What a conversion replaced: the module's class and its parameters' shapes.

    A whole-model manifest (:func:`mumoe.nn.save_model`) keeps it, so that
    :func:`mumoe.nn.load_model` can tell the base model it is given from another.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    dict
        ``{"class": "module.QualName", "parameters": {name: shape}}``, JSON-ready.

    Examples
    --------
    >>> import torch
    >>> replaced_record(torch.nn.Linear(3, 2))
    {'class': 'torch.nn.modules.linear.Linear', 'parameters': {'weight': [2, 3], 'bias': [2]}}
    """
    cls = type(module)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": {name: list(p.shape) for name, p in module.named_parameters()},
    }


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D, recognised without importing transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight ``(O, I)`` and bias ``(O,)`` of a linear layer.

    Parameters
    ----------
    module : torch.nn.Linear or transformers' Conv1D
        ``Conv1D`` (GPT-2's MLP and attention projections) stores its weight
        as ``(I, O)``; it is read transposed.

    Returns
    -------
    weight : torch.Tensor, shape (O, I)
    bias : torch.Tensor of shape (O,), or None

    Raises
    ------
    TypeError
        For any other module.
    ValueError
        For a layer on the meta device (no values to start from).

    Examples
    --------
    >>> weight, bias = linear_weights(nn.Linear(3, 2))
    >>> tuple(weight.shape), tuple(bias.shape)
    ((2, 3), (2,))
    """
    weight: torch.Tensor
    bias: torch.Tensor | None
    if isinstance(module, nn.Linear):
        weight, bias = module.weight, module.bias
    elif _is_conv1d(module):
        weight, bias = module.weight.T, module.bias  # type: ignore[assignment]
    else:
        raise TypeError(
            f"expected a torch.nn.Linear (or transformers' Conv1D), got {type(module).__qualname__}"
        )
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"the {type(module).__name__} is not initialised yet (its weight has no shape): "
            "run the model once on an input, so that it infers its sizes, then convert it"
        )
    if weight.is_meta:
        raise ValueError(
            "the linear layer is on the meta device: it has no weights to start from; "
            "materialise it first (module.to_empty(device=...) and load its state dict)"
        )
    return weight, bias


def from_linear(
    linear: nn.Module,
    network: Network | str | None = "cp",
    *,
    expert_dims: int | Sequence[int],
    rank: RankOrBudget | None = "same",
    layer_class: type[MuMoE] = MuMoE,
    **layer_kwargs: Any,
) -> MuMoE:
    """A μMoE layer whose every expert starts as ``linear`` (or its best approximation).

    Parameters
    ----------
    linear : torch.nn.Linear or transformers' Conv1D
    network : str, default "cp"
        A preset format name (``"cp"``, ``"tucker"``, ``"tt"``, ``"tr"``,
        ``"mxd"``, ``"lowrank"``, ``"dense"``) or its spec string.
    expert_dims : int or sequence of int
    rank : int, tuple, "same" or Budget, default "same"
        The rank, or a parameter budget (:class:`mumoe.Budget`) matched
        against ``linear``, the gate counted.  Formats without a rank
        (``"mxd"``, ``"dense"``) take none: ``"same"`` is then ignored.
    layer_class : type, default MuMoE
        :class:`MuMoE` or a subclass; a preset class (``CPMuMoE``, ...)
        builds its own format (``network`` None or that format).
    **layer_kwargs
        Other :class:`MuMoE` arguments (``normalization``, ``activation``,
        ``top_k``, ...); ``bias``, ``device`` and ``dtype`` come from
        ``linear``.  Not ``input_norm=True``: a layer norm of the input
        changes what the experts see, so no cores start such a layer at
        ``linear``.

    Returns
    -------
    MuMoE
        In train mode, on ``linear``'s device and dtype, with the attribute
        ``conversion_error``: ``||W_n - M||_F / ||M||_F``, the relative error
        of every expert against ``M = [W^T; b]`` (0 where exact; for CP at
        rank ``R``, the Eckart–Young error of the best rank-``R`` matrix).

    Raises
    ------
    TypeError
        For a module that is not a linear layer, or a keyword the linear
        layer decides.
    ValueError
        For a layer on the meta device, a custom spec (no rule to start it),
        ``input_norm=True``, or a budget no rank can reach.

    Examples
    --------
    >>> import torch
    >>> linear = torch.nn.Linear(16, 8)
    >>> layer = from_linear(linear, "mxd", expert_dims=32)
    >>> x = torch.randn(5, 16)
    >>> torch.allclose(layer(x), linear(x), atol=1e-5), layer.conversion_error < 1e-6
    (True, True)
    >>> error = from_linear(linear, "cp", expert_dims=32, rank=4).conversion_error
    >>> 0 < error < 1  # the best rank-4 approximation of a 17 x 8 matrix
    True
    """
    taken = sorted(set(layer_kwargs) & set(_FROM_LINEAR))
    if taken:
        raise TypeError(
            f"from_linear takes {', '.join(taken)} from the linear layer; do not pass them"
        )
    if layer_kwargs.get("input_norm"):
        raise ValueError(
            "from_linear cannot start a layer with input_norm=True at the linear layer: the "
            "layer norm changes the input of every expert, so its outputs would not be "
            "linear(x); convert without it (and add a norm before the layer if one is wanted)"
        )
    weight, bias = linear_weights(linear)
    preset = getattr(layer_class, "format", None)  # CPMuMoE, TRMuMoE, ...: their own format
    if network is None:
        network = preset or "cp"
    elif preset is not None and network != preset:
        raise ValueError(f"{layer_class.__qualname__} is a {preset} layer, got network={network!r}")
    if isinstance(network, str) and network in ("mxd", "dense") and rank == "same":
        rank = None  # no rank to match
    options = {
        "rank": rank,
        "bias": bias is not None,
        "device": weight.device,
        "dtype": weight.dtype,
        **layer_kwargs,
    }
    sizes = (weight.shape[1], weight.shape[0])
    if preset is not None:
        build: Any = layer_class  # a preset class: (in, out, *, expert_dims, rank, ...)
        layer = build(*sizes, expert_dims=expert_dims, **options)
    else:
        layer = layer_class(*sizes, network, expert_dims=expert_dims, **options)
    with torch.no_grad():
        m = dense_matrix(_numpy(weight), None if bias is None else _numpy(bias))
        start = cores_from_dense(layer.network, m, [_numpy(core) for core in layer.cores])
        for core, values in zip(layer.cores, start, strict=True):
            core.copy_(torch.from_numpy(values))
        if layer.gate is not None:
            for projection in layer.gate.projections:
                nn.init.normal_(projection, std=1 / math.sqrt(layer.in_features))
        layer.conversion_error = relative_error(
            layer.network, [_numpy(core) for core in layer.cores], m
        )
    # Parents that read their linear layer's .weight (its dtype, say) get a stand-in.
    layer._stands_in_for = f"the layer converted from {type(linear).__name__}{tuple(sizes)}"
    layer._linear_bias = bias is not None
    layer.converted_from = replaced_record(linear)
    return layer


def _numpy(tensor: torch.Tensor) -> Any:
    return tensor.detach().to("cpu", torch.float64).numpy()


def block_from_mlp(
    fc1: nn.Module,
    fc2: nn.Module,
    network: str = "mxd",
    *,
    expert_dims: int | Sequence[int],
    up: nn.Module | None = None,
    hidden_activation: str = "gelu",
    encoder: str = "linear",
    rank: RankOrBudget | None = "same",
    gate_init: str = "exact",
    calibrate: torch.Tensor | None = None,
    **block_kwargs: Any,
) -> MuMoEBlock:
    """A :class:`MuMoEBlock` that starts as a dense MLP: ``fc2(act(fc1(x)) [* up(x)])``.

    Every expert starts as the MLP, exactly where the network can hold its
    layers (MxD's decoder ``"n o, i o"``; a dense encoder copies ``fc1``) and
    at their best rank-k approximation otherwise (:func:`from_linear`'s rule
    per μMoE layer); the MLP's output bias becomes the block's shared output
    bias (``output_bias="shared"``, exact for any network).  The gate starts
    so that the block computes the MLP: with a simplex activation at random
    (``N(0, 1/I)``, each level summing to one), with ``"relu_topk"`` at zero
    projections and biases of :math:`1/N_e` (every expert tied and kept, the
    coefficients summing to one; training then breaks the ties).

    Parameters
    ----------
    fc1, fc2 : torch.nn.Linear or transformers' Conv1D
        The MLP's first layer ``(H, I)`` and second ``(O, H)``.
    network : str, default "mxd"
        The decoder's (and a μMoE encoder's) format name or spec.
    expert_dims : int or sequence of int
    up : torch.nn.Linear or Conv1D, optional
        A gated MLP's second first layer (Llama's ``up_proj``; ``fc1`` is its
        ``gate_proj``, activated): the block is then a GLU block.
    hidden_activation : str, default "gelu"
        The MLP's: ``"gelu"``, ``"gelu_tanh"`` (GPT-2's ``gelu_new``),
        ``"relu"`` or ``"silu"``.
    encoder : {"linear", "mumoe"}, default "linear"
    rank : int, tuple, "same" or Budget, default "same"
        Of the μMoE layers; ``"same"`` matches each dense layer's parameters
        (ignored by formats without a rank).
    gate_init : {"exact", "random"}, default "exact"
        ``"exact"``: the gate start described above, the block computing the
        MLP.  ``"random"``: under ``"relu_topk"``, projections as
        ``nn.Linear``'s weights and zero biases (MxD's reference), so that
        each token starts with its own ``k`` experts; not exact, but a start
        that distillation moves from quickly, where the tied exact start's
        ReLU logits of :math:`1/N` die within a few optimiser steps.
    calibrate : torch.Tensor, shape (..., I), optional
        With ``gate_init="random"``: inputs of the MLP on which the random
        gate's coefficients sum, per token and over the levels' product, to
        :math:`s` on average; each μMoE layer's first core is divided by
        :math:`s`, so that the block starts near the MLP (every expert starts
        as the MLP, so the block computes it times the token's total
        coefficient over :math:`s`).
    **block_kwargs
        Other :class:`MuMoEBlock` arguments (``activation``, ``top_k``,
        ``normalization``, ``gate_bias``, ``output_bias``, ...); ``bias``,
        ``device`` and ``dtype`` come from the MLP.

    Returns
    -------
    MuMoEBlock
        In train mode, with ``conversion_error``: each μMoE layer's relative
        error against its dense layer (0 where exact).

    Raises
    ------
    TypeError
        For a layer that is not linear, or a keyword the MLP decides.
    ValueError
        If the layers' shapes do not chain, some have biases and others do
        not, or ``"relu_topk"`` comes without ``gate_bias=True`` (no exact start).

    Examples
    --------
    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    >>> block = block_from_mlp(mlp[0], mlp[2], "mxd", expert_dims=128, activation="relu_topk",
    ...                        top_k=8, normalization=None, gate_bias=True)
    >>> x = torch.randn(5, 16)
    >>> torch.allclose(block(x), mlp(x), atol=1e-6), block.conversion_error
    (True, {'fc2': 0.0})
    """
    taken = sorted(set(block_kwargs) & {"bias", "device", "dtype", "glu"})
    if taken:
        raise TypeError(f"block_from_mlp takes {', '.join(taken)} from the MLP; do not pass them")
    if block_kwargs.get("input_norm"):
        raise ValueError(
            "block_from_mlp cannot start a block with input_norm=True at the MLP: the layer "
            "norm changes what the encoder sees"
        )
    layers = {"fc1": fc1, "fc2": fc2} | ({} if up is None else {"up": up})
    weights = {name: linear_weights(layer) for name, layer in layers.items()}
    (hidden, in_features), (out_features, fc2_in) = (
        tuple(weights["fc1"][0].shape),
        tuple(weights["fc2"][0].shape),
    )
    if fc2_in != hidden:
        raise ValueError(
            f"the MLP's layers do not chain: fc1 gives {hidden} features, fc2 takes {fc2_in}"
        )
    if up is not None and tuple(weights["up"][0].shape) != (hidden, in_features):
        raise ValueError(
            f"a gated MLP's up layer must have fc1's shape {(hidden, in_features)} (out, in), "
            f"got {tuple(weights['up'][0].shape)}"
        )
    biased = {name: bias is not None for name, (_, bias) in weights.items()}
    if len(set(biased.values())) > 1:
        raise ValueError(f"the MLP's layers must all have biases or none, got {biased}")
    bias = next(iter(biased.values()))
    if gate_init not in ("exact", "random"):
        raise ValueError(f"unknown gate_init {gate_init!r}; choose 'exact' or 'random'")
    if calibrate is not None and gate_init != "random":
        raise ValueError("calibrate= scales a random gate's start; pass gate_init='random'")
    activation = block_kwargs.get("activation", "entmax15")
    if activation == "relu_topk" and gate_init == "exact" and not block_kwargs.get("gate_bias"):
        raise ValueError(
            "a block gated by 'relu_topk' starts at the MLP only with gate_bias=True (every "
            "expert's logit 1/N, all kept, summing to one); pass gate_bias=True"
        )
    if isinstance(network, str) and network in ("mxd", "dense") and rank == "same":
        rank = None
    reference = weights["fc1"][0]
    block = MuMoEBlock(
        in_features,
        hidden,
        out_features,
        network,
        expert_dims=expert_dims,
        rank=rank,
        bias=bias,
        encoder=encoder,
        hidden_activation=hidden_activation,
        glu=up is not None,
        output_bias=block_kwargs.pop("output_bias", "shared" if bias else "experts"),
        device=reference.device,
        dtype=reference.dtype,
        **block_kwargs,
    )
    errors = {}
    with torch.no_grad():
        for name, (weight, layer_bias) in weights.items():
            part = getattr(block, name)
            if isinstance(part, nn.Linear):
                part.weight.copy_(weight)
                if layer_bias is not None:
                    part.bias.copy_(layer_bias)
                continue
            own_bias = layer_bias if part.network.bias else None
            m = dense_matrix(_numpy(weight), None if own_bias is None else _numpy(own_bias))
            start = cores_from_dense(part.network, m, [_numpy(core) for core in part.cores])
            for core, values in zip(part.cores, start, strict=True):
                core.copy_(torch.from_numpy(values))
            errors[name] = relative_error(part.network, [_numpy(c) for c in part.cores], m)
        if block.bias is not None:
            block.bias.copy_(weights["fc2"][1])  # type: ignore[arg-type]
        gate = block.gate
        for e, projection in enumerate(gate.projections):
            if gate.activation_name == "relu_topk" and gate_init == "random":
                pass  # MuMoEGate's own start: nn.Linear's weights, zero biases
            elif gate.activation_name == "relu_topk":
                nn.init.zeros_(projection)
                gate.biases[e].fill_(1 / gate.expert_dims[e])  # type: ignore[index]
            else:
                nn.init.normal_(projection, std=1 / math.sqrt(in_features))
        if calibrate is not None:
            total = torch.ones(())
            for a in gate(calibrate.to(gate.projections[0])):
                total = total * a.sum(-1).mean()
            if total > 0:
                for layer in block.mumoe_layers:
                    layer.cores[0].div_(total)
    block.conversion_error = errors
    return block


def replace_linear(
    model: nn.Module,
    *,
    include: Include,
    network: str = "cp",
    expert_dims: int | Sequence[int],
    rank: RankOrBudget | None = "same",
    example_inputs: Any = None,
    **layer_kwargs: Any,
) -> nn.Module:
    r"""Replace, in place, the linear layers of ``model`` that ``include`` selects.

    Each is converted by :func:`from_linear` (a budget such as ``"same"`` is
    matched per layer, its gate counted).  Every replacement is built, and
    checked, before any is put in: if one fails, ``model`` is left untouched.

    A linear layer registered under several names (weight tying by
    aliasing) is selected by any of them and replaced, under all of them, by
    one shared μMoE layer.  A linear layer whose weight is tied to another
    module's parameter (``lm_head`` to the embedding) starts from its values
    and the tie is dropped, with a warning.  A converted layer shows its
    parent a stand-in ``.weight`` and ``.bias`` (dtype, device and shape:
    what T5 or ``nn.TransformerEncoderLayer`` read); a parent known to
    compute with the weight itself, ``nn.MultiheadAttention`` (its
    ``out_proj``), is refused.  Give ``example_inputs`` to check any other
    parent: the model runs once on them before the replacement and once
    after, in eval mode and without gradients, and the replacement is undone
    if that fails or a layer that ran before no longer runs.

    Parameters
    ----------
    model : torch.nn.Module
        A model holding linear layers (not a linear layer itself: use
        :func:`from_linear`).
    include : callable or str
        ``include(qualified_name, module) -> bool``, or a regular expression
        searched in the qualified name (``"mlp"``, ``r"\.c_fc$"``).
    network, expert_dims, rank, **layer_kwargs
        As for :func:`from_linear`.
    example_inputs : tuple or mapping, optional
        Positional (a tuple; one tensor alone is taken as one argument) or
        keyword arguments of ``model``'s forward, for the check above.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        If no linear layer matches (the message lists those there are), a
        conversion fails (naming the layer), a parent computes with a
        selected layer's weight, or the check on ``example_inputs`` fails.
    TypeError
        If ``include`` is neither callable nor a string, or ``model`` is a
        linear layer.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> x = torch.randn(3, 8)
    >>> before = model(x)
    >>> replace_linear(model, include="0|2", network="mxd", expert_dims=8)  # doctest: +ELLIPSIS
    Sequential(...)
    >>> type(model[0]).__name__, torch.allclose(model(x), before, atol=1e-5)
    ('MuMoE', True)
    """
    if isinstance(model, nn.Linear) or _is_conv1d(model):
        raise TypeError(
            f"model is itself a linear layer ({type(model).__name__}); replace_linear replaces "
            "the linear layers inside a model: convert this one with mumoe.nn.from_linear"
        )
    select = _selector(include)
    # Every name of every linear layer: one registered twice (aliased) has both.
    names_of: dict[int, list[str]] = {}
    linears: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and (isinstance(module, nn.Linear) or _is_conv1d(module)):
            names_of.setdefault(id(module), []).append(name)
            linears[id(module)] = module
    chosen = [key for key, names in names_of.items() if any(select(n, linears[key]) for n in names)]
    if not chosen:
        every = [name for names in names_of.values() for name in names]
        raise _none_matched(include, every, "linear layers")
    for key in chosen:
        for name in names_of[key]:
            parent = _parent(model, name)[0]
            if isinstance(parent, nn.MultiheadAttention):
                raise ValueError(
                    f"{name!r} cannot become a μMoE layer: nn.MultiheadAttention computes its "
                    "out_proj with out_proj.weight itself (F.multi_head_attention_forward) and "
                    "never calls the module; leave it out of include="
                )
    _warn_of_dropped_ties(model, chosen, names_of, linears)
    replacements = {}
    for key in chosen:
        name = names_of[key][0]
        try:
            layer = from_linear(
                linears[key], network, expert_dims=expert_dims, rank=rank, **layer_kwargs
            )
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"replacing {name!r} failed, the model is unchanged: {error}"
            ) from error
        layer._stands_in_for = " and ".join(map(repr, names_of[key]))
        replacements[key] = layer
    if example_inputs is not None:
        ran_before = _layers_run(model, {key: linears[key] for key in chosen}, example_inputs)
    _put(model, names_of, replacements)
    if example_inputs is not None:
        try:
            ran_after = _layers_run(model, replacements, example_inputs)
        except Exception as error:
            _put(model, names_of, {key: linears[key] for key in chosen})
            raise ValueError(
                "with the μMoE layers in place the model failed on example_inputs, so the "
                f"model is unchanged: {type(error).__name__}: {error}"
            ) from error
        skipped = [names_of[key][0] for key in chosen if key in ran_before - ran_after]
        if skipped:
            _put(model, names_of, {key: linears[key] for key in chosen})
            raise ValueError(
                f"{', '.join(map(repr, skipped))} ran on example_inputs as linear layers but "
                "not as μMoE layers: their parents compute with the weights themselves, which "
                "would skip the experts; the model is unchanged (leave them out of include=)"
            )
    return model


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _put(model: nn.Module, names_of: dict[int, list[str]], layers: Mapping[int, nn.Module]) -> None:
    for key, layer in layers.items():
        for name in names_of[key]:  # every alias: one shared layer
            parent, child = _parent(model, name)
            setattr(parent, child, layer)


def _warn_of_dropped_ties(
    model: nn.Module,
    chosen: list[int],
    names_of: dict[int, list[str]],
    linears: dict[int, nn.Module],
) -> None:
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    for key in chosen:
        own = tuple(f"{name}." for name in names_of[key])
        tied = [p for p in owners.get(id(linears[key].weight), []) if not p.startswith(own)]
        if tied:
            warnings.warn(
                f"{names_of[key][0]}.weight is tied to {', '.join(tied)}: the μMoE layer starts "
                "from its values and holds its own cores, so the tie is dropped (the other "
                "module keeps the parameter and trains it alone)",
                UserWarning,
                stacklevel=3,
            )


def _layers_run(model: nn.Module, layers: Mapping[int, nn.Module], inputs: Any) -> set[int]:
    """Which of ``layers`` run when ``model`` runs once on ``inputs`` (eval, no gradients)."""
    ran: set[int] = set()
    hooks = [
        layer.register_forward_hook(lambda *_, key=key: ran.add(key))
        for key, layer in layers.items()
    ]
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training
    return ran


def _none_matched(include: Include, names: Sequence[str], what: str) -> ValueError:
    """The error of an ``include`` that selects nothing, listing (ten of) the candidates."""
    shown = ", ".join(repr(name) for name in names[:10])
    more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
    return ValueError(
        f"include={include!r} matches none of the model's {len(names)} {what}: "
        f"{shown or 'none'}{more}"
    )


def _selector(include: Include) -> Callable[[str, nn.Module], bool]:
    if isinstance(include, str):
        pattern = re.compile(include)
        return lambda name, module: pattern.search(name) is not None
    if callable(include):
        return include
    raise TypeError(
        f"include must be a callable (name, module) -> bool or a regex string, got {include!r}"
    )
