"""Whole MLPs of a model into μMoE blocks: :func:`replace_mlp`.

An MLP is recognised by its layers, not its class: a gated MLP holds
``gate_proj``, ``up_proj`` and ``down_proj`` (Llama, Mistral, Qwen); a
two-layer MLP ``c_fc`` and ``c_proj`` (GPT-2) or ``fc1`` and ``fc2`` (timm's
``Mlp``, CLIP); a split MLP (BERT, ViT in ``transformers``) is a layer's
``intermediate.dense`` and ``output.dense``, the residual and norm in
``output``.  Its hidden activation is recognised by its values, whatever its
class is called.  Each MLP is checked to compute ``fc2(act(fc1(x)) [*
up(x)])`` on a probe before it is converted by :func:`block_from_mlp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mumoe.nn._block import TORCH_HIDDEN_ACTIVATIONS, MuMoEBlock
from mumoe.nn._convert import (
    Include,
    _is_conv1d,
    _none_matched,
    _parent,
    _selector,
    block_from_mlp,
    linear_weights,
    replaced_record,
)
from mumoe.typing import RankOrBudget

__all__ = ["FoldedIntoBlock", "MLPParts", "find_mlps", "hidden_activation_of", "replace_mlp"]

#: The layer names of the MLPs :func:`find_mlps` recognises: (fc1, up, fc2, activation).
MLP_LAYOUTS: tuple[tuple[str, str | None, str, str], ...] = (
    ("gate_proj", "up_proj", "down_proj", "act_fn"),  # Llama, Mistral, Qwen, Gemma
    ("c_fc", None, "c_proj", "act"),  # GPT-2
    ("fc1", None, "fc2", "act"),  # timm's Mlp, CLIP, OPT-style blocks
    ("fc1", None, "fc2", "activation_fn"),  # CLIP in transformers
)


@dataclass(frozen=True)
class MLPParts:
    """Where one MLP's layers are in a model.

    Parameters
    ----------
    name : str
        The MLP's qualified name (a split MLP's: the layer holding both halves).
    fc1, fc2 : str
        Qualified names of the first layer (a gated MLP's activated one) and
        the second.
    up : str or None
        A gated MLP's other first layer.
    activation : str
        The hidden activation's name in :data:`mumoe.gates.HIDDEN_ACTIVATIONS`.
    split : str or None
        For a split MLP, the qualified name of the module that computes
        ``act(fc1(x))`` (``intermediate``), which the block replaces while
        ``fc2`` becomes the identity.

    Examples
    --------
    >>> MLPParts("mlp", "mlp.c_fc", "mlp.c_proj", None, "gelu_tanh", None).fc1
    'mlp.c_fc'
    """

    name: str
    fc1: str
    fc2: str
    up: str | None
    activation: str
    split: str | None = None


class FoldedIntoBlock(nn.Identity):
    """The identity where a split MLP's second layer was: the block before it computes both.

    :func:`replace_mlp` puts it at a split MLP's ``output.dense`` (BERT, ViT
    in ``transformers``), whose residual and norm stay; it records the layer
    it replaced (:attr:`converted_from`), for :func:`mumoe.nn.load_model`.

    Parameters
    ----------
    converted_from : dict, optional
        The replaced layer's class and parameter shapes (``{"class": ...,
        "parameters": {name: shape}}``).

    Examples
    --------
    >>> import torch
    >>> folded = FoldedIntoBlock()
    >>> x = torch.randn(2, 3)
    >>> folded(x) is x
    True
    """

    def __init__(self, converted_from: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.converted_from = converted_from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` itself: the block before this module computed the whole MLP.

        Parameters
        ----------
        x : torch.Tensor

        Returns
        -------
        torch.Tensor
            ``x``, not a copy.

        Examples
        --------
        >>> import torch
        >>> x = torch.ones(2)
        >>> FoldedIntoBlock().forward(x) is x
        True
        """
        return x

    def extra_repr(self) -> str:
        if self.converted_from is None:
            return "folded into the preceding MuMoEBlock"
        return f"folded into the preceding MuMoEBlock, was {self.converted_from['class']}"


def _is_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def hidden_activation_of(module: Any) -> str:
    """The name of the hidden activation ``module`` computes, recognised by its values.

    Parameters
    ----------
    module : callable
        An activation module or function (``nn.GELU``, transformers'
        ``NewGELUActivation``, ``torch.nn.functional.silu``, ...).

    Returns
    -------
    str
        The matching name of :data:`mumoe.gates.HIDDEN_ACTIVATIONS`.

    Raises
    ------
    ValueError
        If it matches none of them (naming its class).

    Examples
    --------
    >>> hidden_activation_of(torch.nn.GELU(approximate="tanh"))
    'gelu_tanh'
    """
    probe = torch.linspace(-6, 6, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            values = module(probe)
    except Exception as error:
        raise ValueError(f"cannot evaluate the activation {module!r}: {error}") from error
    for name, make in TORCH_HIDDEN_ACTIVATIONS.items():
        with torch.no_grad():
            if torch.allclose(values, make()(probe), rtol=1e-6, atol=1e-9):
                return name
    raise ValueError(
        f"the MLP's activation {type(module).__name__} is none of "
        f"{', '.join(map(repr, TORCH_HIDDEN_ACTIVATIONS))}, which a block computes"
    )


def find_mlps(model: nn.Module) -> list[MLPParts]:
    """The MLPs of ``model`` that :func:`replace_mlp` can convert, in module order.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of MLPParts
        An MLP whose activation is not one a block computes is left out.

    Examples
    --------
    >>> mlp = torch.nn.Module()
    >>> mlp.fc1, mlp.act, mlp.fc2 = torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)
    >>> model = torch.nn.ModuleDict({"mlp": mlp})
    >>> [(p.name, p.fc1, p.activation) for p in find_mlps(model)]
    [('mlp', 'mlp.fc1', 'relu')]
    """
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        children = dict(module.named_children())
        for fc1, up, fc2, act in MLP_LAYOUTS:
            layers = [fc1, fc2] if up is None else [fc1, up, fc2]
            if all(_is_linear(children.get(layer)) for layer in layers) and act in children:
                try:
                    activation = hidden_activation_of(children[act])
                except ValueError:
                    break
                found.append(
                    MLPParts(
                        name,
                        prefix + fc1,
                        prefix + fc2,
                        None if up is None else prefix + up,
                        activation,
                    )
                )
                break
        else:
            inner, outer = children.get("intermediate"), children.get("output")
            if (
                inner is not None
                and outer is not None
                and _is_linear(getattr(inner, "dense", None))
                and _is_linear(getattr(outer, "dense", None))
                and hasattr(inner, "intermediate_act_fn")
            ):
                try:
                    activation = hidden_activation_of(inner.intermediate_act_fn)
                except ValueError:
                    continue
                found.append(
                    MLPParts(
                        name,
                        f"{prefix}intermediate.dense",
                        f"{prefix}output.dense",
                        None,
                        activation,
                        split=f"{prefix}intermediate",
                    )
                )
    return found


def _check_computes_its_layers(model: nn.Module, parts: MLPParts) -> None:
    # The MLP must compute fc2(act(fc1(x)) [* up(x)]) (a split MLP: act(fc1(x)) in its
    # intermediate module): a probe in float64, on a copy, so the model is not touched.
    module = model.get_submodule(parts.split or parts.name)
    fc1 = model.get_submodule(parts.fc1)
    weight, _ = linear_weights(fc1)
    in_features = int(weight.shape[1])
    probe = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(weight.device, weight.dtype)
    act = TORCH_HIDDEN_ACTIVATIONS[parts.activation]()
    with torch.no_grad():
        hidden = act(fc1(probe))
        if parts.up is not None:
            hidden = hidden * model.get_submodule(parts.up)(probe)
        expected = hidden if parts.split else model.get_submodule(parts.fc2)(hidden)
        training = module.training
        module.eval()
        try:
            got = module(probe)
        finally:
            module.train(training)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max() + 1)):
        computes = "act(fc1(x))" if parts.split else "fc2(act(fc1(x)) [* up(x)])"
        raise ValueError(
            f"{parts.split or parts.name!r} ({type(module).__name__}) does not compute "
            f"{computes} with its layers (a norm or a residual inside it?); it cannot become "
            "a block: leave it out of include="
        )


def replace_mlp(
    model: nn.Module,
    *,
    include: Include,
    network: str = "mxd",
    expert_dims: int | Sequence[int],
    rank: RankOrBudget | None = "same",
    encoder: str = "linear",
    **block_kwargs: Any,
) -> nn.Module:
    r"""Replace, in place, the MLPs of ``model`` that ``include`` selects by μMoE blocks.

    Each MLP (:func:`find_mlps`) becomes one :class:`MuMoEBlock` with one
    gate, by :func:`block_from_mlp`: it starts exactly at the MLP where the
    network allows it (MxD's decoder with a dense encoder: every expert is
    the MLP) and at the Eckart–Young best otherwise.  A two-layer or gated
    MLP is replaced whole (its dropout goes with it: blocks are trained and
    evaluated without); a split MLP's ``intermediate`` becomes the block and
    its ``output.dense`` the identity, so the residual and norm of
    ``output`` stay.  Every MLP is checked on a probe, and every block is
    built, before any is put in: if one fails, ``model`` is left untouched.

    Parameters
    ----------
    model : torch.nn.Module
    include : callable or str
        ``include(qualified_name, module) -> bool``, or a regular expression
        searched in the MLP's qualified name (``"mlp"``, ``r"layer\.(3|4)\b"``).
    network, expert_dims, rank, encoder, **block_kwargs
        As for :func:`block_from_mlp` (``activation``, ``top_k``,
        ``normalization``, ``gate_bias``, ...).

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        If no MLP matches (the message lists the MLPs there are), an MLP
        does not compute what its layers say, or a conversion fails (naming
        the MLP); the model is then unchanged.

    Examples
    --------
    >>> mlp = torch.nn.Module()
    >>> mlp.fc1, mlp.act, mlp.fc2 = torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)
    >>> mlp.forward = lambda x: mlp.fc2(mlp.act(mlp.fc1(x)))
    >>> model = torch.nn.ModuleDict({"mlp": mlp})
    >>> x = torch.randn(4, 8)
    >>> before = model["mlp"](x)
    >>> _ = replace_mlp(model, include="mlp", expert_dims=64, activation="softmax",
    ...                 normalization=None)
    >>> type(model["mlp"]).__name__, torch.allclose(model["mlp"](x), before, atol=1e-6)
    ('MuMoEBlock', True)
    """
    select = _selector(include)
    every = find_mlps(model)
    chosen = [parts for parts in every if select(parts.name, model.get_submodule(parts.name))]
    if not chosen:
        raise _none_matched(include, [parts.name for parts in every], "MLPs")
    blocks: dict[str, MuMoEBlock] = {}
    for parts in chosen:
        _check_computes_its_layers(model, parts)
        try:
            blocks[parts.name] = block_from_mlp(
                model.get_submodule(parts.fc1),
                model.get_submodule(parts.fc2),
                network,
                expert_dims=expert_dims,
                up=None if parts.up is None else model.get_submodule(parts.up),
                hidden_activation=parts.activation,
                encoder=encoder,
                rank=rank,
                **block_kwargs,
            )
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"replacing the MLP {parts.name!r} failed, the model is unchanged: {error}"
            ) from error
    for parts in chosen:
        block = blocks[parts.name]
        place = parts.name if parts.split is None else parts.split
        block.converted_from = replaced_record(model.get_submodule(place))
        parent, child = _parent(model, place)
        setattr(parent, child, block)
        if parts.split is not None:
            folded = FoldedIntoBlock(replaced_record(model.get_submodule(parts.fc2)))
            parent, child = _parent(model, parts.fc2)
            setattr(parent, child, folded)
    return model
