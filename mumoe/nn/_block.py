"""MLP blocks with a μMoE decoder as a torch module: :class:`MuMoEBlock`.

The μMoE paper's block (two μMoE layers, GELU between) and MxD's (a dense
encoder, a Hadamard-factorised μMoE decoder, ReLU-top-k gating from the MLP's
input), and their gated (GLU) forms: one module, its forms chosen by keyword.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mumoe.backends import thread_backend
from mumoe.functional import block_forward, dense_gates
from mumoe.gates import check_hidden_activation
from mumoe.nn._bridge import check_input, gate_density
from mumoe.nn._config import (
    config_dtype,
    config_error,
    config_field,
    config_size,
    dtype_name,
    gate_config,
    gate_options,
    known_fields,
    network_config,
    network_from_config,
)
from mumoe.nn._gate import Activation, MuMoEGate
from mumoe.nn._hub import HubMixin
from mumoe.nn._layers import MuMoE
from mumoe.plan import describe, flops
from mumoe.spec import build_network
from mumoe.typing import RankOrBudget
from mumoe.validation import check_bool, positive_int

__all__ = ["ENCODERS", "OUTPUT_BIASES", "TORCH_HIDDEN_ACTIVATIONS", "MuMoEBlock"]


#: The torch modules of :data:`mumoe.gates.HIDDEN_ACTIVATIONS` (the same names).
TORCH_HIDDEN_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}

#: The encoders a block takes: a μMoE layer (of the block's network) or a dense linear layer.
ENCODERS = ("mumoe", "linear")

#: Where a block's decoder keeps its bias: each expert its own, or one shared by all.
OUTPUT_BIASES = ("experts", "shared")


class MuMoEBlock(nn.Module, HubMixin):
    r"""An MLP block whose decoder is a μMoE layer, all its μMoE layers driven by one gate.

    ``y = fc2(act(fc1(z, a)) [* up(z, a)], a) [+ b]`` with ``a = gate(x)``,
    ``z = norm(x)``: the μMoE replacement of a transformer or MLP-Mixer MLP
    (``in -> hidden -> out``).  The gate is computed once, from the block's
    input, and mixes the experts of every μMoE layer (the reference's
    ``second_dim``).  The encoder ``fc1`` is a μMoE layer of the block's
    network (the μMoE paper's block) or a dense ``nn.Linear`` (MxD's); with
    ``glu=True`` a second encoder ``up`` of the same kind multiplies the
    activated one (SwiGLU with ``"silu"``, Llama's MLP).  MxD as published
    (Oldfield et al., 2025) is ``MuMoEBlock(I, H, O, "mxd", expert_dims=N,
    encoder="linear", activation="relu_topk", top_k=k, normalization=None,
    gate_bias=True, output_bias="shared")``.

    Parameters
    ----------
    in_features, hidden_features : int
    out_features : int, optional
        Defaults to ``in_features``.
    network : str, default "cp"
        A format name or a spec string, used for every μMoE layer.
    expert_dims : int or sequence of int
    rank : int, tuple, mapping, "same" or Budget
        For every μMoE layer; a budget is matched per layer against
        ``nn.Linear`` of that layer's sizes, the gate counted in the first
        μMoE layer.
    bias : bool, default True
        Whether the layers have biases (each expert its own in a μMoE layer,
        the input mode's extra slice; ``nn.Linear``'s in a dense encoder).
    encoder : {"mumoe", "linear"}, default "mumoe"
    hidden_activation : {"gelu", "gelu_tanh", "relu", "silu"}, default "gelu"
        :data:`mumoe.gates.HIDDEN_ACTIVATIONS`.
    glu : bool, default False
        A gated hidden layer: ``act(fc1(z)) * up(z)``.
    output_bias : {"experts", "shared"}, default "experts"
        With ``bias``: the decoder's bias is each expert's own (mixed by the
        gate, as μMoE's) or one vector added after the mixture (MxD's, as
        ``nn.Linear``'s); the decoder's network then has no bias slice.
    normalization, activation, top_k, gate_bias, balance, input_norm, device, dtype
        As for :class:`MuMoE`.

    Raises
    ------
    ValueError
        For an unknown encoder, hidden activation or output bias, or
        ``output_bias="shared"`` without ``bias``.

    Examples
    --------
    >>> import torch
    >>> block = MuMoEBlock(16, 64, network="cp", expert_dims=8, rank=16)
    >>> block(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    >>> mxd = MuMoEBlock(16, 64, 16, "mxd", expert_dims=512, encoder="linear",
    ...                  activation="relu_topk", top_k=8, normalization=None, gate_bias=True,
    ...                  output_bias="shared")
    >>> mxd(torch.randn(3, 16)).shape, type(mxd.fc1).__name__
    (torch.Size([3, 16]), 'Linear')
    """

    #: Set by :func:`mumoe.nn.block_from_mlp`: each μMoE layer's relative error
    #: against the dense layer it started from (None for a block built otherwise).
    conversion_error: dict[str, float] | None = None
    #: Set by :func:`mumoe.nn.replace_mlp`: the class and parameter shapes of the MLP the
    #: block replaced (:func:`mumoe.nn.save_model` keeps it to check a base model).
    converted_from: dict[str, Any] | None = None

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
        encoder: str = "mumoe",
        hidden_activation: str = "gelu",
        glu: bool = False,
        output_bias: str = "experts",
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
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose 'mumoe' or 'linear'")
        if output_bias not in OUTPUT_BIASES:
            raise ValueError(f"unknown output_bias {output_bias!r}; choose 'experts' or 'shared'")
        if output_bias == "shared" and not bias:
            raise ValueError("output_bias='shared' is the decoder's bias: it needs bias=True")
        out_features = in_features if out_features is None else out_features
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.encoder = encoder
        self.hidden_activation = check_hidden_activation(hidden_activation)
        self.glu = check_bool(glu, "glu")
        self.output_bias = output_bias
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        gated_encoder = encoder == "mumoe"
        second = build_network(
            hidden_features,
            out_features,
            network,
            expert_dims=expert_dims,
            rank=rank,
            bias=bias and output_bias == "experts",
            count_gates=not gated_encoder,  # the gate is counted once, in the first μMoE layer
            gate_bias=gate_bias,
        )
        self.gate = MuMoEGate(
            in_features,
            second.expert_dims,
            normalization=normalization,
            activation=activation,
            top_k=top_k,
            bias=gate_bias,
            balance=balance,
            **factory,
        )
        self.input_norm = nn.LayerNorm(in_features, **factory) if input_norm else None

        def make_encoder(count_gates: bool) -> MuMoE | nn.Linear:
            if not gated_encoder:
                return nn.Linear(in_features, hidden_features, bias=bias, **factory)
            first = build_network(
                in_features,
                hidden_features,
                network,
                expert_dims=expert_dims,
                rank=rank,
                bias=bias,
                count_gates=count_gates,
                gate_bias=gate_bias,
            )
            return MuMoE(in_features, hidden_features, first, bias=bias, gated=False, **factory)

        self.fc1: MuMoE | nn.Linear = make_encoder(count_gates=True)
        self.up: MuMoE | nn.Linear | None = make_encoder(count_gates=False) if self.glu else None
        self.act = TORCH_HIDDEN_ACTIVATIONS[self.hidden_activation]()
        self.fc2 = MuMoE(
            hidden_features, out_features, second, bias=second.bias, gated=False, **factory
        )
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(out_features, **factory)) if output_bias == "shared" else None
        )

    @property
    def mumoe_layers(self) -> list[MuMoE]:
        """The block's μMoE layers, encoders first, the decoder last.

        Examples
        --------
        >>> block = MuMoEBlock(8, 16, expert_dims=4, rank=2, encoder="linear")
        >>> [layer.in_features for layer in block.mumoe_layers]
        [16]
        """
        layers = [self.fc1, self.up, self.fc2]
        return [layer for layer in layers if isinstance(layer, MuMoE)]

    def reset_parameters(self) -> None:
        """Re-initialise every layer and the gate.

        Examples
        --------
        >>> block = MuMoEBlock(8, 16, expert_dims=4, rank=2)
        >>> block.reset_parameters()
        >>> block.fc1.init_scheme, block.fc2.init_scheme
        ('cp', 'cp')
        """
        self.gate.reset_parameters()
        for layer in (self.fc1, self.up, self.fc2):
            if layer is not None:
                layer.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.input_norm is not None:
            self.input_norm.reset_parameters()

    def forward(
        self, x: torch.Tensor, *, return_gates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``fc2(act(fc1(norm(x), a)) [* up(norm(x), a)], a) [+ bias]`` with ``a = gate(x)``.

        Parameters
        ----------
        x : torch.Tensor, shape (..., I)
        return_gates : bool, default False
            Also return the coefficients used, as dense tensors (see
            :meth:`MuMoE.forward <mumoe.nn.MuMoE.forward>`).

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
        check_input(x, self.in_features)
        # Levels whose support is within the decoder's crossover come as supports.
        sparsified = self.gate.support is None
        density = gate_density(self.fc2.planner, x, list(self.fc2.cores), sparsified)
        y, gates = block_forward(
            self._encoder_call(self.fc1),
            self.fc2,
            x,
            gate=functools.partial(self.gate, max_density=density) if density > 0 else self.gate,
            activation=self.act,
            input_norm=self.input_norm,
            up=None if self.up is None else self._encoder_call(self.up),
            output_bias=self.bias,
        )
        if not return_gates:
            return y
        with thread_backend("pytorch"):
            return y, dense_gates(gates)

    def get_config(self) -> dict[str, Any]:
        """The block's constructor settings, as JSON, from its current state.

        Each μMoE layer's network is given exactly (an encoder's rank may
        differ from the decoder's where a budget was matched per layer).

        Returns
        -------
        dict
            :meth:`from_config` builds the block back from it.

        Raises
        ------
        TypeError
            For a subclass of the block.
        ValueError
            For a custom activation callable or gate norm, or bond regularizers.

        Examples
        --------
        >>> config = MuMoEBlock(8, 32, 4, expert_dims=4, rank="same").get_config()
        >>> config["networks"]["fc1"]["rank"], config["networks"]["fc2"]["rank"]
        ({'r': 5}, {'r': 3})
        """
        if type(self) is not MuMoEBlock:
            raise TypeError(f"{type(self).__qualname__} has no configuration: a MuMoEBlock has")
        if any(layer._modules.get("bond_regularizer") is not None for layer in self.mumoe_layers):
            raise ValueError(
                "the block's layers have bond regularizers, a training setting a configuration "
                "does not hold: prune_bonds(block, ...) folds them into the cores"
            )
        return {
            "class": "MuMoEBlock",
            "in_features": self.in_features,
            "hidden_features": self.hidden_features,
            "out_features": self.out_features,
            "bias": self.fc2.network.bias or self.bias is not None,
            "encoder": self.encoder,
            "hidden_activation": self.hidden_activation,
            "glu": self.glu,
            "output_bias": self.output_bias,
            "networks": {
                part: network_config(layer.network) if isinstance(layer, MuMoE) else None
                for part, layer in (("fc1", self.fc1), ("up", self.up), ("fc2", self.fc2))
            },
            "gate": gate_config(self.gate, "block"),
            "input_norm": self.input_norm is not None,
            "dtype": dtype_name(self.fc2.cores[0]),
        }

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        where: str = "",
    ) -> MuMoEBlock:
        """A freshly initialised block of the forms and shapes ``config`` describes.

        Parameters
        ----------
        config : mapping
            As :meth:`get_config` gives it (read from JSON).
        device : torch.device or str, optional
        dtype : torch.dtype, optional
            Of the parameters; by default the configuration's.
        where : str, optional
            Named in messages.

        Returns
        -------
        MuMoEBlock

        Raises
        ------
        ValueError
            If a field is missing, unknown, mistyped or invalid, or the
            configuration is of another class.

        Examples
        --------
        >>> block = MuMoEBlock(8, 32, expert_dims=4, rank="same", glu=True)
        >>> rebuilt = MuMoEBlock.from_config(block.get_config())
        >>> rebuilt.up.network == block.up.network
        True
        """
        where = where or "of a MuMoEBlock"
        keys = {
            "class", "in_features", "hidden_features", "out_features", "bias", "encoder",
            "hidden_activation", "glu", "output_bias", "networks", "gate", "input_norm", "dtype",
        }  # fmt: skip
        if config_field(config, "class", str, where) != "MuMoEBlock":
            raise config_error(where, f"holds a {config['class']}, not a MuMoEBlock")
        known_fields(config, keys, where)
        in_features, hidden, out_features = (
            config_size(config, key, where)
            for key in ("in_features", "hidden_features", "out_features")
        )
        networks = config_field(config, "networks", dict, where)
        known_fields(networks, {"fc1", "up", "fc2"}, f"{where}, networks")
        sizes = {
            "fc1": (in_features, hidden),
            "up": (in_features, hidden),
            "fc2": (hidden, out_features),
        }
        built = {
            part: network_from_config(networks[part], *sizes[part], f"{where}, networks.{part}")
            for part in sizes
            if networks.get(part) is not None
        }
        if "fc2" not in built:
            raise config_error(where, "networks.fc2 is missing: a block's decoder is a μMoE layer")
        factory: dict[str, Any] = {"device": device, "dtype": dtype or config_dtype(config, where)}
        decoder = built["fc2"]
        scaffold: str = decoder.spec
        scaffold_rank: int | dict[str, int] | None = dict(decoder.ranks) or None
        if decoder.splits:
            # A split spec needs its legs' sizes, which differ between the layers: build on
            # a rank-1 CP of the same experts, every layer replaced below.
            scaffold, scaffold_rank = "cp", 1
        try:
            block = cls(
                in_features,
                hidden,
                out_features,
                scaffold,
                expert_dims=decoder.expert_dims,
                rank=scaffold_rank,
                bias=config_field(config, "bias", bool, where),
                encoder=config.get("encoder"),  # type: ignore[arg-type]
                hidden_activation=config.get("hidden_activation"),  # type: ignore[arg-type]
                glu=config_field(config, "glu", bool, where),
                output_bias=config.get("output_bias"),  # type: ignore[arg-type]
                input_norm=config_field(config, "input_norm", bool, where),
                **gate_options(config.get("gate"), f"{where}, gate"),
                **factory,
            )
        except (TypeError, ValueError) as error:
            if str(error).startswith("configuration "):
                raise
            raise config_error(where, str(error)) from error
        # The encoders' ranks may differ from the decoder's (a budget matched per layer).
        for part, network in built.items():
            layer = getattr(block, part)
            if not isinstance(layer, MuMoE) or layer.network.expert_dims != network.expert_dims:
                raise config_error(where, f"networks.{part} does not fit the block's encoder")
            if layer.network != network:
                replacement = MuMoE(
                    *sizes[part], network, bias=network.bias, gated=False, **factory
                )
                setattr(block, part, replacement)
        return block

    def describe(self, batch_size: int = 1) -> str:
        r"""A readable account of the block: forms, parameters and FLOPs per part.

        Each μMoE layer is then described by :func:`mumoe.describe` (its
        network, path and FLOPs); a dense layer costs :math:`2BIH` (with its
        bias), the gate :math:`2BI\sum_e N_e` (its activation aside).

        Parameters
        ----------
        batch_size : int, default 1

        Returns
        -------
        str

        Examples
        --------
        >>> block = MuMoEBlock(16, 64, 16, "mxd", expert_dims=512, encoder="linear",
        ...                    activation="relu_topk", top_k=8, normalization=None,
        ...                    gate_bias=True, output_bias="shared")
        >>> print(block.describe(batch_size=4))  # doctest: +ELLIPSIS
        MuMoEBlock 16 -> 64 -> 16: encoder linear, hidden gelu, decoder mxd, output bias shared
          gate        512 experts, relu_topk (top_k=8), normalization None, bias: 8,704 parameters
          fc1         linear 16 -> 64: 1,088 parameters, 8,448 FLOPs for batch 4
          fc2         mxd 64 -> 16: 9,216 parameters, 73,792 FLOPs for batch 4
          bias        16 parameters
          total       19,024 parameters, 147,776 FLOPs for batch 4 (gate 65,536)
        <BLANKLINE>
        fc2: Network 'mxd': 1 expert level, 512 experts, no bias
        ...
        """
        batch = positive_int(batch_size, "batch_size")
        gate = self.gate
        n_experts = sum(gate.expert_dims)
        gate_params = sum(p.numel() for p in gate.parameters())
        gate_flops = 2 * batch * self.in_features * n_experts
        options = f"{gate.activation_name}" + (
            "" if gate.top_k is None else f" (top_k={gate.top_k})"
        )
        bias = ", bias" if gate.biases is not None else ""
        lines = [
            f"MuMoEBlock {self.in_features} -> {self.hidden_features} -> {self.out_features}: "
            f"encoder {self.encoder}, hidden {self.hidden_activation}"
            + (" (GLU)" if self.glu else "")
            + f", decoder {self.fc2.network.format}, output bias {self.output_bias}",
            f"  gate        {' x '.join(map(str, gate.expert_dims))} experts, {options}, "
            f"normalization {gate.normalization}{bias}: {gate_params:,} parameters",
        ]
        total_params, total_flops = gate_params, gate_flops
        details = []
        for name in ("fc1", "up", "fc2"):
            layer = getattr(self, name)
            if layer is None:
                continue
            n_params = sum(p.numel() for p in layer.parameters())
            if isinstance(layer, MuMoE):
                n_flops = flops(layer.network, batch, planner=layer.planner)
                kind = layer.network.format
                details.append(f"{name}: {describe(layer.network, batch, planner=layer.planner)}")
            else:
                n_flops = 2 * batch * layer.in_features * layer.out_features
                n_flops += batch * layer.out_features if layer.bias is not None else 0
                kind = "linear"
            lines.append(
                f"  {name:<11} {kind} {layer.in_features} -> {layer.out_features}: "
                f"{n_params:,} parameters, {n_flops:,} FLOPs for batch {batch}"
            )
            total_params += n_params
            total_flops += n_flops
        if self.bias is not None:
            lines.append(f"  bias        {self.bias.numel():,} parameters")
            total_params += self.bias.numel()
        if self.input_norm is not None:
            n_params = sum(p.numel() for p in self.input_norm.parameters())
            lines.append(f"  input norm  layer norm: {n_params:,} parameters")
            total_params += n_params
        lines.append(
            f"  total       {total_params:,} parameters, {total_flops:,} FLOPs for batch "
            f"{batch} (gate {gate_flops:,})"
        )
        return "\n".join([*lines, "", *details])

    @staticmethod
    def _encoder_call(layer: nn.Module) -> Any:
        if isinstance(layer, MuMoE):
            return layer
        return lambda z, gates: layer(z)

    def extra_repr(self) -> str:
        """Sizes and forms, for ``repr``."""
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"out_features={self.out_features}, encoder={self.encoder!r}, "
            f"hidden_activation={self.hidden_activation!r}, glu={self.glu}, "
            f"output_bias={self.output_bias!r}"
        )
