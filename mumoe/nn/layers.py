r"""PyTorch μMoE layers: thin modules over :mod:`mumoe.functional`.

Index legend: ``b`` batch, ``t`` tokens (any number of leading dimensions),
``i`` input, ``o`` output, ``n_e`` expert mode ``e``, ``r`` rank.

The modules own parameters (the cores, the gate projections) and call the
functional core; the contraction itself, its plan cache and its checks live
there.  They run the functional core with TensorLy's ``pytorch`` backend
active for the calling thread only (:func:`mumoe.backend.thread_backend`),
so they work whatever backend the rest of the program has chosen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mumoe import functional
from mumoe.backend import thread_backend
from mumoe.matching import match_rank
from mumoe.network import Network
from mumoe.nn.gating import Activation, MuMoEGate
from mumoe.nn.init import init_cores_
from mumoe.presets import PRESETS
from mumoe.typing import Rank

__all__ = [
    "CPMuMoE",
    "MuMoE",
    "MuMoEBlock",
    "TRMuMoE",
    "TTMuMoE",
    "TuckerMuMoE",
    "build_network",
    "record_gates",
    "torch_forward",
]

RankOrBudget = Rank | dict[str, int] | str | float


def build_network(
    in_features: int,
    out_features: int,
    network: Network | str,
    *,
    expert_dims: int | Sequence[int] | None = None,
    rank: RankOrBudget | None = None,
    bias: bool = True,
    count_gates: bool = True,
) -> Network:
    """The network of a layer, from a Network, a preset name or a spec string.

    Parameters
    ----------
    in_features, out_features : int
    network : Network or str
        A :class:`~mumoe.Network` (whose sizes must agree and which then
        takes no ``expert_dims``/``rank``), a preset name (``"cp"``,
        ``"tucker"``, ``"tt"``, ``"tr"``, ``"dense"``) or a spec string.
    expert_dims : int or sequence of int
        Experts per level; required with a preset or a spec.
    rank : int, tuple, mapping, "same" or float
        The preset's or spec's rank.  With a preset, ``"same"`` or a float
        chooses the rank by :func:`mumoe.matching.match_rank` (the parameters
        of ``nn.Linear(in_features, out_features)``, or that fraction of them).
    bias : bool, default True
    count_gates : bool, default True
        Whether a budget counts the gate projections.

    Returns
    -------
    Network

    Examples
    --------
    >>> dict(build_network(768, 1000, "cp", expert_dims=128, rank="same").ranks)
    {'r': 353}
    >>> build_network(16, 4, "n1 a, i a b, o b", expert_dims=8, rank={"a": 2, "b": 3}).core_shapes
    ((8, 2), (17, 2, 3), (4, 3))
    """
    if isinstance(network, Network):
        if (network.in_features, network.out_features) != (in_features, out_features):
            raise ValueError(
                f"network has in_features={network.in_features}, out_features="
                f"{network.out_features}, but the layer was given {in_features}, {out_features}"
            )
        if expert_dims is not None or rank is not None:
            raise ValueError("expert_dims and rank come from the Network; do not pass them as well")
        if network.bias != bias:
            raise ValueError(f"network has bias={network.bias} but the layer was given bias={bias}")
        return network
    if not isinstance(network, str):
        raise TypeError(
            f"network must be a Network, a preset name or a spec string, got {network!r}"
        )
    if expert_dims is None:
        raise ValueError(f"network {network!r} needs expert_dims (experts per level)")
    if network in PRESETS:
        if network == "dense":
            if rank is not None:
                raise ValueError(f"the dense network has no rank, got rank={rank!r}")
            return PRESETS["dense"](expert_dims, in_features, out_features, bias=bias)
        if rank is None:
            raise ValueError(f"the {network} network needs a rank (an int, 'same' or a float)")
        if isinstance(rank, str | float):
            rank = match_rank(
                network, expert_dims, in_features, out_features,
                budget=rank, bias=bias, gates=count_gates,
            )  # fmt: skip
        return PRESETS[network](expert_dims, in_features, out_features, rank=rank, bias=bias)
    if isinstance(rank, str | float):
        raise ValueError(
            "a parameter budget ('same' or a float) chooses the rank of a preset only; "
            "give a spec string its bond sizes"
        )
    return Network(network, expert_dims, in_features, out_features, rank=rank, bias=bias)  # type: ignore[arg-type]


def torch_forward(
    network: Network,
    cores: Sequence[torch.Tensor],
    x: torch.Tensor,
    gates: Sequence[torch.Tensor],
) -> torch.Tensor:
    """:func:`mumoe.functional.forward` from torch: pytorch backend, grad mode respected.

    The one path every torch module takes into the functional core: TensorLy's
    ``pytorch`` backend for this thread only, and ``differentiable`` from
    torch's grad mode (it chooses how the bias is added).  Under
    ``torch.autocast``, every operand is cast to the autocast dtype, and so is
    the result, as for ``torch.nn.Linear``.

    Parameters
    ----------
    network : Network
    cores : sequence of torch.Tensor
        Of shapes ``network.core_shapes``.
    x : torch.Tensor, shape (..., I)
    gates : sequence of torch.Tensor, each (..., N_e)

    Returns
    -------
    torch.Tensor, shape (..., O)

    Examples
    --------
    >>> import torch
    >>> from mumoe import cp
    >>> net = cp(4, 3, 2, rank=5)
    >>> cores = [torch.randn(s, requires_grad=True) for s in net.core_shapes]
    >>> y = torch_forward(net, cores, torch.randn(6, 3), [torch.rand(6, 4)])
    >>> y.shape, y.requires_grad
    (torch.Size([6, 2]), True)
    """
    if torch.is_autocast_enabled(x.device.type):
        # Autocast casts the operands of torch's own matmuls; mumoe's operands
        # must share one dtype, so they are cast together, to autocast's dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, cores, gates = x.to(dtype), [c.to(dtype) for c in cores], [g.to(dtype) for g in gates]
    differentiable = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
    with thread_backend("pytorch"):
        return functional.forward(network, cores, x, gates, differentiable=differentiable)


class MuMoE(nn.Module):
    r"""A Multilinear Mixture-of-Experts layer (Eq. 1 of the paper).

    .. math::
        y_{bo} = \sum_{n_1, \dots, n_E, i}
        \mathcal{W}[n_1, \dots, n_E, i, o]\,
        a^{(1)}_{b n_1} \cdots a^{(E)}_{b n_E}\, z_{bi},
        \qquad a^{(e)}_b = \phi\bigl(\mathrm{norm}(x_b G_e)\bigr)

    with :math:`z_b = [x_b, 1]` when ``bias`` and :math:`\mathcal{W}` stored
    factorised as ``network``; :math:`\mathcal{W}` is never formed.

    Parameters
    ----------
    in_features : int
        :math:`I`.
    out_features : int
        :math:`O`.
    network : Network or str, default "cp"
        A :class:`~mumoe.Network`, a preset name or a spec string (see
        :func:`build_network`).
    expert_dims : int or sequence of int, optional
        :math:`N_1, \dots, N_E`; required unless ``network`` is a Network.
    rank : int, tuple, mapping, "same" or float, optional
        The rank (see :func:`build_network`).
    bias : bool, default True
        Whether every expert has a bias (the input mode's extra slice).
    normalization : {"bn", "ln", None}, default "bn"
        Of the gate logits.
    activation : {"entmax15", "sparsemax", "softmax"} or callable, default "entmax15"
        Of the gate logits.
    input_norm : bool, default False
        Apply ``nn.LayerNorm(in_features)`` to the input of the contraction
        (after the gates are computed from the raw input), as the reference's
        ``apply_ln``.
    gated : bool, default True
        Whether the layer owns a gate; without one, ``forward`` needs gates.
    device, dtype
        Of the parameters.

    Attributes
    ----------
    network : Network
    cores : torch.nn.ParameterList
        One parameter per core, of shapes ``network.core_shapes``.
    gate : MuMoEGate or None
    input_norm : torch.nn.LayerNorm or None

    Notes
    -----
    The input must have the parameters' dtype and device (a ``TypeError`` or
    ``ValueError`` says which differs); nothing is converted silently.  Under
    ``torch.autocast`` the contraction runs in the autocast dtype and returns
    it, as ``torch.nn.Linear`` does.  Gating always computes in float32 at
    least (:mod:`mumoe.nn.gating`), so float16 and bfloat16 layers cannot get
    NaNs from it; the coefficients are cast to the input's dtype.  An empty
    batch gives an empty output; NaN or inf in a row of the input gives NaN
    in that row's output (in eval mode; in training, batch norm spreads them
    over the batch, as it does in torch).

    Examples
    --------
    >>> import torch
    >>> layer = MuMoE(16, 10, "cp", expert_dims=32, rank=8)
    >>> layer(torch.randn(4, 16)).shape
    torch.Size([4, 10])
    >>> layer(torch.randn(4, 7, 16)).shape
    torch.Size([4, 7, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        network: Network | str = "cp",
        *,
        expert_dims: int | Sequence[int] | None = None,
        rank: RankOrBudget | None = None,
        bias: bool = True,
        normalization: str | None = "bn",
        activation: str | Activation = "entmax15",
        input_norm: bool = False,
        gated: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.network = build_network(
            in_features, out_features, network,
            expert_dims=expert_dims, rank=rank, bias=bias, count_gates=gated,
        )  # fmt: skip
        self.in_features = in_features
        self.out_features = out_features
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        shapes = self.network.core_shapes if self._owns_cores else ()
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, **factory)) for shape in shapes]
        )
        self.gate = (
            MuMoEGate(
                in_features,
                self.network.expert_dims,
                normalization=normalization,
                activation=activation,
                **factory,
            )
            if gated
            else None
        )
        self.input_norm = nn.LayerNorm(in_features, **factory) if input_norm else None
        self.expert_scales = {}
        self.reset_parameters()

    #: Whether the cores are this module's own parameters (``self.cores``);
    #: subclasses that take them from elsewhere set it to False.
    _owns_cores = True

    #: Factors applied to the experts of some levels, ``{level: (N_e,)}``, set
    #: by :func:`mumoe.analysis.edit_experts` for the duration of an edit.  They
    #: act as ``W[.., n_e, ..] * s[n_e]``; the stored cores are not touched.
    expert_scales: dict[int, torch.Tensor]

    def reset_parameters(self) -> None:
        """Initialise the cores as the paper does (see :mod:`mumoe.nn.init`) and zero the gate.

        Examples
        --------
        >>> import torch
        >>> layer = MuMoE(8, 4, "cp", expert_dims=6, rank=3)
        >>> with torch.no_grad():
        ...     _ = layer.gate.projections[0].fill_(1.0)
        >>> layer.reset_parameters()
        >>> bool(layer.gate.projections[0].eq(0).all()), layer.init_scheme
        (True, 'cp')
        """
        self._init_weights_()
        if self.gate is not None:
            self.gate.reset_parameters()
        if self.input_norm is not None:
            self.input_norm.reset_parameters()

    def _init_weights_(self) -> None:
        self.init_scheme = init_cores_(self.network, list(self.cores))

    def _weights(self) -> tuple[Network, list[torch.Tensor]]:
        # The network and cores to contract; subclasses that hold their
        # weights differently (mumoe.nn.factorized) override this.
        # ParameterList's own iterator formats an index string per item: read
        # the parameters directly (a tenth of the time at small sizes).
        return self.network, list(self.cores._parameters.values())  # type: ignore[arg-type]

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__qualname__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have shape (..., {self.in_features}) (in_features), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"input has dtype {x.dtype}; μMoE layers compute in floating point: cast it "
                "(x.float(), x.to(layer's dtype))"
            )

    @staticmethod
    def _check_weights(x: torch.Tensor, weight: torch.Tensor) -> None:
        # get_device() is an int (-1 on CPU): a cheaper test than comparing devices.
        if x.get_device() != weight.get_device():
            raise ValueError(
                f"input is on {x.device} but the layer's parameters are on {weight.device}; "
                "move one of them (x.to(...) or layer.to(...))"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input has dtype {x.dtype} but the layer's parameters are {weight.dtype}; "
                "cast one of them (x.to(dtype) or layer.to(dtype)), or run under torch.autocast"
            )

    def forward(
        self,
        x: torch.Tensor,
        gates: Sequence[torch.Tensor] | torch.Tensor | None = None,
        *,
        return_gates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Mix the experts for input ``x``.

        Parameters
        ----------
        x : torch.Tensor, shape (..., I)
        gates : sequence of torch.Tensor, each (..., N_e), optional
            Coefficients to use instead of the layer's gate (required when
            the layer has none); a single tensor with one expert level.
        return_gates : bool, default False
            Also return the coefficients used.

        Returns
        -------
        torch.Tensor, shape (..., O)
            And the list of gates when ``return_gates``.

        Examples
        --------
        >>> import torch
        >>> layer = MuMoE(8, 4, "tr", expert_dims=(6, 2), rank=2)
        >>> y, gates = layer(torch.randn(3, 5, 8), return_gates=True)
        >>> y.shape, [tuple(a.shape) for a in gates]
        (torch.Size([3, 5, 4]), [(3, 5, 6), (3, 5, 2)])
        """
        self._check_input(x)
        network, cores = self._weights()
        self._check_weights(x, cores[0])
        if gates is None:
            if self.gate is None:
                raise ValueError("this layer has no gate (gated=False): pass gates to forward")
            gates = self.gate(x)
        coefficients = [gates] if isinstance(gates, torch.Tensor) else list(gates)
        mixed = coefficients
        if self.expert_scales:
            # W is linear in each expert mode: scaling a_e[n] is scaling W[.., n, ..].
            mixed = [
                a * self.expert_scales[e].to(a) if e in self.expert_scales else a
                for e, a in enumerate(coefficients)
            ]
        z = self.input_norm(x) if self.input_norm is not None else x
        y = torch_forward(network, cores, z, mixed)
        return (y, coefficients) if return_gates else y

    def materialize(self) -> torch.Tensor:
        """The dense weight tensor, for inspection.

        Returns
        -------
        torch.Tensor, shape (N_1, ..., N_E, I', O)
            Differentiable with respect to the cores.

        Examples
        --------
        >>> MuMoE(8, 4, "cp", expert_dims=(6, 2), rank=3).materialize().shape
        torch.Size([6, 2, 9, 4])
        """
        with thread_backend("pytorch"):
            return functional.materialize(*self._weights())

    def expert_weight(self, index: int | Sequence[int]) -> functional.ExpertWeight:
        """One expert's affine map, without materialising W.

        Parameters
        ----------
        index : int or sequence of int
            One index per expert level (an int with one level).

        Returns
        -------
        mumoe.ExpertWeight
            ``weight`` (I, O) and ``bias`` (O,) (None without bias).

        Examples
        --------
        >>> w = MuMoE(8, 4, "cp", expert_dims=(6, 2), rank=3).expert_weight((5, 1))
        >>> w.weight.shape, w.bias.shape
        (torch.Size([8, 4]), torch.Size([4]))
        """
        with thread_backend("pytorch"):
            return functional.expert_weight(*self._weights(), index)

    def extra_repr(self) -> str:
        """Sizes and options, for ``repr``."""
        net = self.network
        rank = f", rank={dict(net.ranks)}" if net.ranks else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"network={net.format!r}, spec={net.spec!r}, expert_dims={net.expert_dims}"
            f"{rank}, bias={net.bias}, init={self.init_scheme!r}, params={net.n_params:,}"
        )


def _preset_layer(format: str) -> type[MuMoE]:
    def __init__(
        self: MuMoE,
        in_features: int,
        out_features: int,
        expert_dims: int | Sequence[int],
        *,
        rank: RankOrBudget,
        **options: Any,
    ) -> None:
        MuMoE.__init__(
            self, in_features, out_features, format, expert_dims=expert_dims, rank=rank, **options
        )

    name = {"cp": "CP", "tucker": "Tucker", "tt": "TT", "tr": "TR"}[format]
    doc = f"""A μMoE layer whose weight tensor is a {name} network.

    ``{name}MuMoE(in_features, out_features, expert_dims, rank=...)`` is
    ``MuMoE(in_features, out_features, "{format}", expert_dims=..., rank=...)``;
    see :class:`MuMoE` for the other options and :func:`mumoe.{format}` for
    the rank format (``"same"`` or a float chooses it by parameter budget).

    Parameters
    ----------
    in_features, out_features : int
    expert_dims : int or sequence of int
        Experts per level.
    rank : int, tuple, "same" or float
        The {format} rank, or a parameter budget.
    **options
        The other keyword arguments of :class:`MuMoE` (``bias``,
        ``normalization``, ``activation``, ``device``, ``dtype``, ...).

    Examples
    --------
    >>> import torch
    >>> layer = {name}MuMoE(64, 32, (8, 4), rank="same")  # as many parameters as nn.Linear
    >>> layer(torch.randn(3, 64)).shape
    torch.Size([3, 32])
    """
    return type(f"{name}MuMoE", (MuMoE,), {"__init__": __init__, "__doc__": doc})


CPMuMoE = _preset_layer("cp")
TuckerMuMoE = _preset_layer("tucker")
TTMuMoE = _preset_layer("tt")
TRMuMoE = _preset_layer("tr")
for _cls in (CPMuMoE, TuckerMuMoE, TTMuMoE, TRMuMoE):
    _cls.__module__ = __name__


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
        A preset name or a spec string, used for both layers.
    expert_dims : int or sequence of int
    rank : int, tuple, mapping, "same" or float
        For both layers; a budget is matched per layer against
        ``nn.Linear`` of that layer's sizes, the gate counted in the first.
    bias, normalization, activation, input_norm, device, dtype
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
            in_features, hidden_features, network,
            expert_dims=expert_dims, rank=rank, bias=bias, count_gates=True,
        )  # fmt: skip
        second = build_network(
            hidden_features, out_features, network,
            expert_dims=expert_dims, rank=rank, bias=bias, count_gates=False,
        )  # fmt: skip
        self.gate = MuMoEGate(
            in_features, first.expert_dims,
            normalization=normalization, activation=activation, **factory,
        )  # fmt: skip
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
        """``fc2(gelu(fc1(x, a)), a)`` with ``a = gate(x)``.

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
        self.fc1._check_input(x)
        gates = self.gate(x)
        z = self.input_norm(x) if self.input_norm is not None else x
        y = self.fc2(self.act(self.fc1(z, gates)), gates)
        return (y, gates) if return_gates else y


class GateRecord(dict[str, list[torch.Tensor]]):
    """Detached gate coefficients of the last forward, by gate module name.

    Examples
    --------
    >>> import torch
    >>> block = MuMoEBlock(8, 16, expert_dims=(4, 2), rank=3)
    >>> with record_gates(block) as record:
    ...     _ = block(torch.randn(5, 8))
    >>> {name: [tuple(a.shape) for a in gates] for name, gates in record.items()}
    {'gate': [(5, 4), (5, 2)]}
    """


@contextmanager
def record_gates(model: nn.Module) -> Iterator[GateRecord]:
    """Record, detached, the coefficients every gate of ``model`` computes.

    The record maps each :class:`MuMoEGate`'s qualified name (``"gate"``,
    ``"blocks.3.gate"``, ...) to the list of coefficients of its last call,
    each ``(..., N_e)``.  Nothing is stored on the modules, and the hooks are
    removed on exit.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; every :class:`MuMoEGate` inside it is recorded.

    Yields
    ------
    GateRecord
        Filled by each forward pass inside the block.

    Examples
    --------
    >>> import torch
    >>> layer = MuMoE(16, 10, "cp", expert_dims=8, rank=4)
    >>> with record_gates(layer) as gates:
    ...     _ = layer(torch.randn(3, 16))
    >>> [tuple(a.shape) for a in gates["gate"]], gates["gate"][0].requires_grad
    ([(3, 8)], False)
    """
    record = GateRecord()
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, MuMoEGate):

            def hook(_: nn.Module, __: Any, output: list[torch.Tensor], name: str = name) -> None:
                record[name] = [a.detach() for a in output]

            handles.append(module.register_forward_hook(hook))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
