"""Experts from several pretrained linears: :func:`from_linears`.

N dense layers (a Mixtral-style MoE's experts, fine-tuned copies of one layer),
or N x M for two levels, become one μMoE layer whose experts start as them:
their weights are stacked and the network fitted to them by
:func:`mumoe.functional.cores_from_experts` (exact for dense, TensorLy's
decompositions for CP, Tucker, TT and TR), each expert's error reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mumoe.functional import cores_from_experts, expert_errors, expert_tensor
from mumoe.nn._convert import _FROM_LINEAR, _numpy, linear_weights
from mumoe.nn._layers import MuMoE
from mumoe.typing import RankOrBudget

__all__ = ["from_linears"]


def _expert_grid(linears: Any) -> tuple[list[Any], tuple[int, ...]]:
    """The leaves of a nested sequence of layers, in C order, and the nesting's shape."""
    if isinstance(linears, torch.Tensor) and linears.dim() > 2:  # stacked (N..., O, I)
        return list(linears.detach().reshape(-1, *linears.shape[-2:])), tuple(linears.shape[:-2])
    if isinstance(linears, nn.ModuleList):
        linears = list(linears)
    if isinstance(linears, nn.Module | torch.Tensor) or not isinstance(linears, Sequence):
        return [linears], ()
    if not linears:
        raise ValueError("from_linears needs at least one layer at each level, got an empty list")
    grids = [_expert_grid(item) for item in linears]
    shapes = {shape for _, shape in grids}
    if len(shapes) > 1:
        raise ValueError(f"the nested lists of layers must be rectangular, got shapes {shapes}")
    return [leaf for leaves, _ in grids for leaf in leaves], (len(linears), *shapes.pop())


def _weights_of(item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, torch.Tensor):
        if item.dim() != 2:
            raise ValueError(
                f"layer {index} is a tensor of shape {tuple(item.shape)}; a weight is (O, I), "
                "as nn.Linear holds it"
            )
        return item.detach(), None
    try:
        return linear_weights(item)
    except TypeError as error:
        raise TypeError(f"layer {index}: {error}") from error


def from_linears(
    linears: Sequence[Any],
    network: str | None = "cp",
    *,
    rank: RankOrBudget | None = None,
    layer_class: type[MuMoE] = MuMoE,
    random_state: int = 0,
    **layer_kwargs: Any,
) -> MuMoE:
    r"""A μMoE layer whose experts start as several dense layers, one expert each.

    The layers' :math:`[W_n^\top; b_n]` are stacked into :math:`\mathcal{W}`
    (:func:`mumoe.functional.expert_tensor`) and the network is fitted to it
    (:func:`mumoe.functional.cores_from_experts`): exactly for ``"dense"``,
    by TensorLy's decompositions for CP, Tucker, TT and TR, by each expert's
    truncated SVD for ``"lowrank"`` and per output column for ``"mxd"``.
    The gate starts at random (``N(0, 1/I)`` projections), so each token
    starts with its own mix of the experts; with a one-hot gate the layer
    computes that expert's (fitted) layer.

    Parameters
    ----------
    linears : sequence of layers, or of sequences of layers, or a tensor
        ``nn.Linear`` or ``transformers``' ``Conv1D`` modules, or weight
        tensors ``(O, I)`` (no bias); a flat list (or ``nn.ModuleList``) gives
        one expert level of ``N`` experts, a list of ``N`` lists of ``M`` two
        levels ``N x M`` (expert ``(n, m)`` is ``linears[n][m]``), and so on; a
        tensor ``(N..., O, I)`` is the weights stacked (``transformers``'
        Mixtral's ``experts.down_proj``).  All of one shape, with biases all
        or none.
    network : str, default "cp"
        A preset format name (``"dense"``, ``"cp"``, ``"tucker"``, ``"tt"``,
        ``"tr"``, ``"lowrank"``, ``"mxd"``); a preset ``layer_class`` builds its
        own (``network`` None or that format).
    rank : int, tuple or Budget, optional
        The format's rank (required but for ``"dense"`` and ``"mxd"``); a
        budget is matched against one of the layers.
    layer_class : type, default MuMoE
    random_state : int, default 0
        For decompositions that draw.
    **layer_kwargs
        Other :class:`MuMoE` arguments (``normalization``, ``activation``,
        ...); ``expert_dims``, ``bias``, ``device`` and ``dtype`` come from
        the layers.

    Returns
    -------
    MuMoE
        In train mode, on the layers' device and dtype, with
        ``conversion_error``: each expert's relative error, an array of shape
        ``expert_dims`` (0 where exact).

    Raises
    ------
    ValueError
        For layers of different shapes, biases on some only, a ragged nesting,
        or a format with no fit (a custom spec).
    TypeError
        For an item that is not a linear layer or a weight, or a keyword the
        layers decide.

    Examples
    --------
    >>> import torch
    >>> experts = [torch.nn.Linear(16, 8) for _ in range(4)]
    >>> layer = from_linears(experts, "dense", normalization=None)
    >>> x = torch.randn(5, 16)
    >>> one_hot = torch.zeros(5, 4)
    >>> one_hot[:, 2] = 1.0
    >>> torch.allclose(layer(x, [one_hot]), experts[2](x), atol=1e-6)
    True
    >>> float(layer.conversion_error.max())
    0.0
    """
    taken = sorted(set(layer_kwargs) & {*_FROM_LINEAR, "expert_dims"})
    if taken:
        raise TypeError(f"from_linears takes {', '.join(taken)} from the layers; do not pass them")
    if layer_kwargs.get("input_norm"):
        raise ValueError("from_linears cannot start a layer with input_norm=True at the layers")
    leaves, dims = _expert_grid(linears)
    if not dims:
        raise TypeError("from_linears takes a sequence of layers; convert one with from_linear")
    pairs = [_weights_of(item, k) for k, item in enumerate(leaves)]
    shapes = {tuple(w.shape) for w, _ in pairs}
    if len(shapes) > 1:
        raise ValueError(f"the layers must all have one shape (O, I), got {sorted(shapes)}")
    biased = {b is not None for _, b in pairs}
    if len(biased) > 1:
        raise ValueError("the layers must all have biases or none")
    weight = pairs[0][0]
    out_features, in_features = weight.shape
    weights = np.stack([_numpy(w) for w, _ in pairs]).reshape(*dims, out_features, in_features)
    biases = None
    if biased.pop():
        biases = np.stack([_numpy(b) for _, b in pairs if b is not None])
        biases = biases.reshape(*dims, out_features)
    preset = getattr(layer_class, "format", None)  # CPMuMoE, TRMuMoE, ...: their own format
    if network is None:
        network = preset or "cp"
    elif preset is not None and network != preset:
        raise ValueError(f"{layer_class.__qualname__} is a {preset} layer, got network={network!r}")
    if network in ("mxd", "dense") and rank is not None:
        raise ValueError(f"the {network} format has no rank; do not pass rank={rank!r}")
    options = {
        "expert_dims": dims,
        "rank": rank,
        "bias": biases is not None,
        "device": weight.device,
        "dtype": weight.dtype,
        **layer_kwargs,
    }
    sizes = (in_features, out_features)
    if preset is not None:
        build: Any = layer_class  # a preset class: (in, out, *, expert_dims, rank, ...)
        layer = build(*sizes, **options)
    else:
        layer = layer_class(*sizes, network, **options)
    tensor = expert_tensor(weights, biases)
    cores, _ = cores_from_experts(layer.network, tensor, random_state=random_state)
    with torch.no_grad():
        for core, values in zip(layer.cores, cores, strict=True):
            core.copy_(torch.from_numpy(values))
        if layer.gate is not None:
            for projection in layer.gate.projections:
                nn.init.normal_(projection, std=1 / math.sqrt(in_features))
    # Measured on the layer's own cores, in its dtype (a bfloat16 layer's rounding counts).
    layer.conversion_error = expert_errors(layer.network, [_numpy(c) for c in layer.cores], tensor)
    return layer
