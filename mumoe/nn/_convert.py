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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mumoe.functional import cores_from_dense, dense_matrix, relative_error
from mumoe.nn._layers import MuMoE
from mumoe.spec import Network
from mumoe.typing import RankOrBudget

__all__ = ["from_linear", "linear_weights", "replace_linear"]

Include = Callable[[str, nn.Module], bool] | str

#: Keyword arguments a conversion sets itself, from the linear layer.
_FROM_LINEAR = ("bias", "device", "dtype")


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
    return layer


def _numpy(tensor: torch.Tensor) -> Any:
    return tensor.detach().to("cpu", torch.float64).numpy()


def replace_linear(
    model: nn.Module,
    *,
    include: Include,
    network: str = "cp",
    expert_dims: int | Sequence[int],
    rank: RankOrBudget | None = "same",
    **layer_kwargs: Any,
) -> nn.Module:
    r"""Replace, in place, the linear layers of ``model`` that ``include`` selects.

    Each is converted by :func:`from_linear` (a budget such as ``"same"`` is
    matched per layer, its gate counted).  Every replacement is built before
    any is put in: if one fails, ``model`` is left untouched.

    Parameters
    ----------
    model : torch.nn.Module
    include : callable or str
        ``include(qualified_name, module) -> bool``, or a regular expression
        searched in the qualified name (``"mlp"``, ``r"\.c_fc$"``).
    network, expert_dims, rank, **layer_kwargs
        As for :func:`from_linear`.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        If no linear layer matches (the message lists those there are), or a
        conversion fails (naming the layer).
    TypeError
        If ``include`` is neither callable nor a string.

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
    select = _selector(include)
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if name and (isinstance(module, nn.Linear) or _is_conv1d(module))
    ]
    chosen = [(name, module) for name, module in linears if select(name, module)]
    if not chosen:
        names = ", ".join(repr(name) for name, _ in linears[:10])
        more = f" (and {len(linears) - 10} more)" if len(linears) > 10 else ""
        raise ValueError(
            f"include={include!r} matches none of the model's {len(linears)} linear layers: "
            f"{names or 'none'}{more}"
        )
    replacements = {}
    for name, module in chosen:
        try:
            replacements[name] = from_linear(
                module, network, expert_dims=expert_dims, rank=rank, **layer_kwargs
            )
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"replacing {name!r} failed, the model is unchanged: {error}"
            ) from error
    for name, layer in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model


def _selector(include: Include) -> Callable[[str, nn.Module], bool]:
    if isinstance(include, str):
        pattern = re.compile(include)
        return lambda name, module: pattern.search(name) is not None
    if callable(include):
        return include
    raise TypeError(
        f"include must be a callable (name, module) -> bool or a regex string, got {include!r}"
    )
