"""The two-layer μMoE block as a torch module: :class:`MuMoEBlock`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mumoe.functional import block_forward
from mumoe.nn._bridge import check_input
from mumoe.nn._gate import Activation, MuMoEGate
from mumoe.nn._layers import MuMoE
from mumoe.spec import build_network
from mumoe.typing import RankOrBudget

__all__ = ["MuMoEBlock"]


class MuMoEBlock(nn.Module):
    r"""Two μMoE layers with a GELU between, driven by the same gates.

    The μMoE replacement of a transformer or MLP-Mixer MLP
    (``in -> hidden -> out``); the gates are computed once, from the block's
    input, and mix the experts of both layers (the reference's ``second_dim``).

    Parameters
    ----------
    in_features, hidden_features : int
    out_features : int, optional
        Defaults to ``in_features``.
    network : str, default "cp"
        A format name or a spec string, used for both layers.
    expert_dims : int or sequence of int
    rank : int, tuple, mapping, "same" or Budget
        For both layers; a budget is matched per layer against
        ``nn.Linear`` of that layer's sizes, the gate counted in the first.
    bias, normalization, activation, top_k, gate_bias, balance, input_norm, device, dtype
        As for :class:`MuMoE`.

    Examples
    --------
    >>> import torch
    >>> block = MuMoEBlock(16, 64, network="cp", expert_dims=8, rank=16)
    >>> block(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        network: str = "cp",
        *,
        expert_dims: int | Sequence[int],
        rank: RankOrBudget | None = None,
        bias: bool = True,
        normalization: str | None = "bn",
        activation: str | Activation = "entmax15",
        top_k: int | None = None,
        gate_bias: bool = False,
        balance: Mapping[str, float] | None = None,
        input_norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features = in_features if out_features is None else out_features
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        first = build_network(
            in_features,
            hidden_features,
            network,
            expert_dims=expert_dims,
            rank=rank,
            bias=bias,
            count_gates=True,
            gate_bias=gate_bias,
        )
        second = build_network(
            hidden_features,
            out_features,
            network,
            expert_dims=expert_dims,
            rank=rank,
            bias=bias,
            count_gates=False,
        )
        self.gate = MuMoEGate(
            in_features,
            first.expert_dims,
            normalization=normalization,
            activation=activation,
            top_k=top_k,
            bias=gate_bias,
            balance=balance,
            **factory,
        )
        self.input_norm = nn.LayerNorm(in_features, **factory) if input_norm else None
        self.fc1 = MuMoE(in_features, hidden_features, first, bias=bias, gated=False, **factory)
        self.act = nn.GELU()
        self.fc2 = MuMoE(hidden_features, out_features, second, bias=bias, gated=False, **factory)

    def reset_parameters(self) -> None:
        """Re-initialise both layers and the gate.

        Examples
        --------
        >>> block = MuMoEBlock(8, 16, expert_dims=4, rank=2)
        >>> block.reset_parameters()
        >>> block.fc1.init_scheme, block.fc2.init_scheme
        ('cp', 'cp')
        """
        self.gate.reset_parameters()
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        if self.input_norm is not None:
            self.input_norm.reset_parameters()

    def forward(
        self, x: torch.Tensor, *, return_gates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``fc2(gelu(fc1(norm(x), a)), a)`` with ``a = gate(x)``, by the block recipe.

        Parameters
        ----------
        x : torch.Tensor, shape (..., I)
        return_gates : bool, default False
            Also return the coefficients used.

        Returns
        -------
        torch.Tensor, shape (..., O)
            And the list of gates when ``return_gates``.

        Examples
        --------
        >>> import torch
        >>> block = MuMoEBlock(8, 16, 6, expert_dims=4, rank=2)
        >>> y, gates = block(torch.randn(2, 3, 8), return_gates=True)
        >>> y.shape, gates[0].shape
        (torch.Size([2, 3, 6]), torch.Size([2, 3, 4]))
        """
        check_input(x, self.fc1.in_features)
        y, gates = block_forward(
            self.fc1, self.fc2, x, gate=self.gate, activation=self.act, input_norm=self.input_norm
        )
        return (y, gates) if return_gates else y
