"""The μMoE layers of one format each: :class:`CPMuMoE`, :class:`TTMatrixMuMoE`, ....

Each is :class:`~mumoe.nn.MuMoE` with its format fixed and its keywords
spelled out; each is added to ``LAYER_CLASSES``, the layer classes a configuration
(:meth:`MuMoE.get_config <mumoe.nn.MuMoE.get_config>`) may name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mumoe.nn._gate import Activation
from mumoe.nn._layers import LAYER_CLASSES, MuMoE
from mumoe.plan import Planner
from mumoe.spec import Budget
from mumoe.typing import Rank

__all__ = [
    "LAYER_CLASSES",
    "CPMuMoE",
    "TRMuMoE",
    "TTMatrixMuMoE",
    "TTMuMoE",
    "TuckerMuMoE",
]


class _PresetMuMoE(MuMoE):
    """A MuMoE of one format (``format``), its keywords spelled out and the rank required."""

    format: str

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        expert_dims: int | Sequence[int],
        rank: Rank | str | Budget,
        bias: bool = True,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        normalization: str | None = "bn",
        activation: str | Activation = "entmax15",
        top_k: int | None = None,
        gate_bias: bool = False,
        balance: Mapping[str, float] | None = None,
        input_norm: bool = False,
        gated: bool = True,
        planner: Planner | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            self.format,
            expert_dims=expert_dims,
            rank=rank,
            bias=bias,
            in_shape=in_shape,
            out_shape=out_shape,
            normalization=normalization,
            activation=activation,
            top_k=top_k,
            gate_bias=gate_bias,
            balance=balance,
            input_norm=input_norm,
            gated=gated,
            planner=planner,
            device=device,
            dtype=dtype,
        )


class CPMuMoE(_PresetMuMoE):
    r"""A μMoE layer whose weight tensor is a CP network (:func:`mumoe.cp`).

    ``CPMuMoE(in_features, out_features, expert_dims=..., rank=...)`` is
    ``MuMoE(in_features, out_features, "cp", expert_dims=..., rank=...)``.

    Parameters
    ----------
    in_features, out_features : int
    expert_dims : int or sequence of int
        Experts per level.
    rank : int, "same" or Budget
        The CP rank (:func:`mumoe.validate_cp_rank`), or a parameter budget.
    bias, in_shape, out_shape, normalization, activation, top_k, gate_bias
        As for :class:`MuMoE`.
    balance, input_norm, gated, planner
        As for :class:`MuMoE`.
    device, dtype
        Of the parameters.

    Examples
    --------
    >>> import torch
    >>> layer = CPMuMoE(64, 32, expert_dims=(8, 4), rank="same")  # as many parameters as nn.Linear
    >>> layer(torch.randn(3, 64)).shape
    torch.Size([3, 32])
    """

    format = "cp"


class TuckerMuMoE(_PresetMuMoE):
    r"""A μMoE layer whose weight tensor is a Tucker network (:func:`mumoe.tucker`).

    ``TuckerMuMoE(in_features, out_features, expert_dims=..., rank=...)`` is
    ``MuMoE(in_features, out_features, "tucker", expert_dims=..., rank=...)``.

    Parameters
    ----------
    in_features, out_features : int
    expert_dims : int or sequence of int
        Experts per level.
    rank : int or tuple of int, "same" or Budget
        The Tucker rank (:func:`mumoe.validate_tucker_rank`), or a parameter budget.
    bias, in_shape, out_shape, normalization, activation, top_k, gate_bias
        As for :class:`MuMoE`.
    balance, input_norm, gated, planner
        As for :class:`MuMoE`.
    device, dtype
        Of the parameters.

    Examples
    --------
    >>> import torch
    >>> layer = TuckerMuMoE(64, 32, expert_dims=(8, 4), rank=(2, 2, 8, 8))
    >>> layer(torch.randn(3, 64)).shape
    torch.Size([3, 32])
    """

    format = "tucker"


class TTMuMoE(_PresetMuMoE):
    r"""A μMoE layer whose weight tensor is a TT network (:func:`mumoe.tt`).

    ``TTMuMoE(in_features, out_features, expert_dims=..., rank=...)`` is
    ``MuMoE(in_features, out_features, "tt", expert_dims=..., rank=...)``.

    Parameters
    ----------
    in_features, out_features : int
    expert_dims : int or sequence of int
        Experts per level.
    rank : int or tuple of int, "same" or Budget
        The TT rank (:func:`mumoe.validate_tt_rank`), or a parameter budget.
    bias, in_shape, out_shape, normalization, activation, top_k, gate_bias
        As for :class:`MuMoE`.
    balance, input_norm, gated, planner
        As for :class:`MuMoE`.
    device, dtype
        Of the parameters.

    Examples
    --------
    >>> import torch
    >>> layer = TTMuMoE(64, 32, expert_dims=(8, 4), rank=(2, 2, 8))
    >>> layer(torch.randn(3, 64)).shape
    torch.Size([3, 32])
    """

    format = "tt"


class TRMuMoE(_PresetMuMoE):
    r"""A μMoE layer whose weight tensor is a TR network (:func:`mumoe.tr`).

    ``TRMuMoE(in_features, out_features, expert_dims=..., rank=...)`` is
    ``MuMoE(in_features, out_features, "tr", expert_dims=..., rank=...)``.

    Parameters
    ----------
    in_features, out_features : int
    expert_dims : int or sequence of int
        Experts per level.
    rank : int or tuple of int, "same" or Budget
        The TR rank (:func:`mumoe.validate_tr_rank`), or a parameter budget.
    bias, in_shape, out_shape, normalization, activation, top_k, gate_bias
        As for :class:`MuMoE`.
    balance, input_norm, gated, planner
        As for :class:`MuMoE`.
    device, dtype
        Of the parameters.

    Examples
    --------
    >>> import torch
    >>> layer = TRMuMoE(64, 32, expert_dims=(8, 4), rank=(4, 4, 4, 16))
    >>> layer(torch.randn(3, 64)).shape
    torch.Size([3, 32])
    """

    format = "tr"


class TTMatrixMuMoE(_PresetMuMoE):
    r"""A μMoE layer whose experts are TT-matrices (:func:`mumoe.ttm`).

    ``TTMatrixMuMoE(in_features, out_features, expert_dims=..., rank=...,
    in_shape=..., out_shape=...)`` is ``MuMoE(in_features, out_features,
    "ttm", ...)``: the input and output split into legs of one length
    (balanced ones by default, :func:`mumoe.ttm`), one core per pair.

    Parameters
    ----------
    in_features, out_features : int
    expert_dims : int or sequence of int
        Experts per level.
    rank : int, sequence of int, "same" or Budget
        The chain's ranks (:func:`mumoe.ttm`), or a parameter budget.
    bias, in_shape, out_shape, normalization, activation, top_k, gate_bias
        As for :class:`MuMoE`.
    balance, input_norm, gated, planner
        As for :class:`MuMoE`.
    device, dtype
        Of the parameters.

    Examples
    --------
    >>> import torch
    >>> layer = TTMatrixMuMoE(768, 768, expert_dims=64, rank=8, in_shape=(32, 24),
    ...                       out_shape=(32, 24))
    >>> layer(torch.randn(3, 768)).shape, layer.network.n_params
    (torch.Size([3, 768]), 72704)
    """

    format = "ttm"


LAYER_CLASSES.update(
    (cls.__name__, cls) for cls in (CPMuMoE, TuckerMuMoE, TTMuMoE, TRMuMoE, TTMatrixMuMoE)
)
