r"""PyTorch μMoE layers: thin modules over the layer recipe of :mod:`mumoe.functional`.

Index legend: ``b`` batch, ``t`` tokens (any number of leading dimensions),
``i`` input, ``o`` output, ``n_e`` expert mode ``e``, ``r`` rank.

The modules own parameters (the cores, the gate projections) and state
(batch-norm statistics, active expert edits) and call the recipe; the
contraction itself, its plan cache and its checks live in the functional
core.  They run it with TensorLy's ``pytorch`` backend active for the
calling thread only (:func:`mumoe.backends.thread_backend`), so they work
whatever backend the rest of the program has chosen.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mumoe import functional
from mumoe.backends import thread_backend
from mumoe.functional import check_level, check_support_indices, layer_forward
from mumoe.nn._bridge import (
    check_gate_devices,
    check_input,
    gate_density,
    module_contract,
    not_scriptable,
)
from mumoe.nn._config import (
    config_dtype,
    config_error,
    config_field,
    config_size,
    gate_options,
    known_fields,
    layer_config,
    network_from_config,
)
from mumoe.nn._gate import Activation, MuMoEGate
from mumoe.nn._hub import HubMixin
from mumoe.nn._init import init_cores_
from mumoe.nn._stand_in import LinearStandIn, stand_in
from mumoe.plan import Planner, resolve_planner
from mumoe.spec import Network, build_network
from mumoe.typing import RankOrBudget
from mumoe.validation import check_scales

__all__ = ["LAYER_CLASSES", "MuMoE"]


#: Guards taking a layer's edit ownership (module-level: a lock would not pickle).
_EDITS = threading.Lock()


class MuMoE(nn.Module, HubMixin):
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
        A :class:`~mumoe.Network`, a format name or a spec string (see
        :func:`mumoe.build_network`).
    expert_dims : int or sequence of int, optional
        :math:`N_1, \dots, N_E`; required unless ``network`` is a Network.
    rank : int, tuple, mapping, "same" or Budget, optional
        The rank (see :func:`mumoe.build_network`).
    bias : bool, default True
        Whether every expert has a bias (the input mode's extra slice).
    in_shape, out_shape : sequence of int, optional
        Split the input or output into legs of these sizes (a format's
        modes, or a spec's ``i1 ... iK``/``o1 ... oL``): :class:`mumoe.Network`.
    normalization : {"bn", "ln", None}, default "bn"
        Of the gate logits.
    activation : str or callable, default "entmax15"
        Of the gate logits: one of :data:`mumoe.gates.ACTIVATIONS`
        (``"entmax15"``, ``"sparsemax"``, ``"softmax"``, ``"topk"``,
        ``"relu_topk"``), or a callable.
    top_k : int, optional
        With ``activation="topk"`` or ``"relu_topk"``: the experts each token
        keeps (:func:`mumoe.gates.topk`, :func:`mumoe.gates.relu_topk`).
    gate_bias : bool, default False
        A bias on the gate logits (:class:`MuMoEGate`, ``bias``), counted by
        a parameter budget; not with ``normalization="bn"``.
    balance : mapping of str to float, optional
        Balance losses for the gate, ``{name: coefficient}``: each forward
        pass sets ``gate.aux_loss`` (:class:`MuMoEGate`,
        :func:`mumoe.nn.collect_aux_losses`).  A training setting, like an
        optimiser's: weights files (:func:`mumoe.nn.save`) do not hold it.
    input_norm : bool, default False
        Apply ``nn.LayerNorm(in_features)`` to the input of the contraction
        (after the gates are computed from the raw input), as the reference's
        ``apply_ln``.
    gated : bool, default True
        Whether the layer owns a gate; without one, ``forward`` needs gates.
    planner : Planner, optional
        A planner of the layer's network: its path policy (optimiser,
        autotuning) and plan cache; :func:`mumoe.plan.planner_of` by default,
        shared with every equal network.  Settable later (:attr:`planner`).
    device, dtype
        Of the parameters.

    Attributes
    ----------
    network : Network
    cores : torch.nn.ParameterList
        One parameter per core, of shapes ``network.core_shapes``.
    gate : MuMoEGate or None
    input_norm : torch.nn.LayerNorm or None
    weight, bias : LinearStandIn
        Only on layers made by :func:`mumoe.nn.from_linear`, for parents that
        read their linear layer's: the dtype, device and shape of
        ``nn.Linear(in_features, out_features)``'s, and nothing else
        (:mod:`mumoe.nn`'s "Converting pretrained models").  Assigning
        ``weight`` (``tie_weights``) is ignored with a warning.

    Notes
    -----
    The input must have the parameters' dtype and device (a ``TypeError`` or
    ``ValueError`` says which differs); nothing is converted silently.  Under
    ``torch.autocast`` the contraction runs in the autocast dtype and returns
    it, as ``torch.nn.Linear`` does.  Gating always computes in float32 at
    least (:mod:`mumoe.nn`), so float16 and bfloat16 layers cannot get
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
        super().__init__()
        self.network = build_network(
            in_features,
            out_features,
            network,
            expert_dims=expert_dims,
            rank=rank,
            bias=bias,
            count_gates=gated,
            gate_bias=gate_bias,
            in_shape=in_shape,
            out_shape=out_shape,
        )
        self.planner = planner  # None: the default planner
        self.in_features = in_features
        self.out_features = out_features
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        shapes = self.network.core_shapes if self._owns_cores else ()
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, **factory)) for shape in shapes]
        )
        gate_options = {
            "normalization": normalization,
            "activation": activation,
            "top_k": top_k,
            "bias": gate_bias,
            "balance": balance,
            **factory,
        }
        dims = self.network.expert_dims
        self.gate = MuMoEGate(in_features, dims, **gate_options) if gated else None
        self.input_norm = nn.LayerNorm(in_features, **factory) if input_norm else None
        # The expert edits in force ({level: (N_e,)}), set by scaled_experts only.
        self._expert_scales: dict[int, torch.Tensor] = {}
        self.reset_parameters()

    #: Whether the cores are this module's own parameters (``self.cores``); False: elsewhere.
    _owns_cores = True
    #: Set by :func:`mumoe.nn.from_linear` (the layer's name in messages): the layer
    #: stands in for a linear layer, and shows ``weight``/``bias`` stand-ins.
    _stands_in_for: str | None = None
    #: Whether the linear layer it stands in for had a bias.
    _linear_bias = False
    #: The relative error of the conversion: from_linear's float, from_linears' array of experts.
    conversion_error: Any = None
    #: Set by the conversions: the class and parameter shapes of the module replaced
    #: (:func:`mumoe.nn.save_model` keeps it, to check a base model on loading).
    converted_from: dict[str, Any] | None = None
    __prepare_scriptable__ = not_scriptable  # torch.jit.script: say what works instead

    def reset_parameters(self) -> None:
        """Initialise the cores as the paper does (see :mod:`mumoe.nn`) and zero the gate.

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

    @property
    def planner(self) -> Planner:
        """The planner the layer contracts with (a planner of :attr:`network`).

        Set it to another planner of the same network to change the path
        policy, e.g. ``layer.planner = planner_of(layer.network, autotune=True)``;
        ``None`` restores the default, :func:`mumoe.plan.planner_of`.

        Examples
        --------
        >>> from mumoe.plan import planner_of
        >>> layer = MuMoE(8, 4, "cp", expert_dims=6, rank=3)
        >>> layer.planner is planner_of(layer.network)
        True
        >>> layer.planner = planner_of(layer.network, autotune=True)
        >>> layer.planner.autotune
        True
        """
        planner: Planner = self.__dict__["_planner"]
        return planner

    @planner.setter
    def planner(self, planner: Planner | None) -> None:
        self.__dict__["_planner"] = resolve_planner(self.network, planner)

    @property
    def weight(self) -> LinearStandIn:
        """The replaced linear layer's weight, as a stand-in: dtype, device and shape only.

        Only on layers made by :func:`mumoe.nn.from_linear`; any computation
        with it raises ``RuntimeError`` naming the layer.

        Examples
        --------
        >>> import torch
        >>> from mumoe.nn import from_linear
        >>> layer = from_linear(torch.nn.Linear(8, 4), "mxd", expert_dims=6)
        >>> layer.weight.dtype, tuple(layer.weight.shape)
        (torch.float32, (4, 8))
        """
        return self._stand_in("weight", (self.out_features, self.in_features))

    @property
    def bias(self) -> LinearStandIn | None:
        """The replaced linear layer's bias, as a stand-in (None where it had none).

        Only on layers made by :func:`mumoe.nn.from_linear`, as :attr:`weight`.

        Examples
        --------
        >>> import torch
        >>> from mumoe.nn import from_linear
        >>> tuple(from_linear(torch.nn.Linear(8, 4), "mxd", expert_dims=6).bias.shape)
        (4,)
        """
        if self._stands_in_for is not None and not self._linear_bias:
            return None
        return self._stand_in("bias", (self.out_features,))

    def _stand_in(self, role: str, shape: tuple[int, ...]) -> LinearStandIn:
        if self._stands_in_for is None:  # nn.Module's message
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{role}'")
        first = self._weights()[1][0]
        return stand_in(shape, first.dtype, first.device, self._stands_in_for, role)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight" and self.__dict__.get("_stands_in_for") is not None:
            # transformers' tie_weights: a μMoE layer has no dense weight to tie.
            warnings.warn(
                f"{self._stands_in_for} is a μMoE layer and holds no dense weight: the "
                "assignment to its .weight is ignored (a tie to it stays dropped)",
                UserWarning,
                stacklevel=2,
            )
            return
        super().__setattr__(name, value)

    def _weights(self, *, dropout: bool = False) -> tuple[Network, list[torch.Tensor]]:
        # The network and cores to contract (a bond regularizer's view of them; its
        # dropout only where the forward pass asks); subclasses that hold their
        # weights differently (mumoe.nn) override this.  Per-call cost matters for
        # one-row calls: the submodule and its parameters read from their dicts.
        cores = list(self._modules["cores"]._parameters.values())  # type: ignore[union-attr]
        bonds = self._modules.get("bond_regularizer")  # mumoe.nn.regularize_bonds
        if bonds is None:
            return self.network, cores
        return self.network, bonds(self.network, cores, dropout=dropout)

    @contextmanager
    def scaled_experts(self, level: int, scales: Any) -> Iterator[None]:
        r"""Inside the block, compute with the experts of ``level`` scaled by ``scales``.

        :math:`\mathcal{W}[\dots, n_e, \dots]` acts multiplied by
        ``scales[n_e]`` (0 switches an expert off); the stored cores are not
        touched and gradients still flow.  Done on the coefficients, exact
        because :math:`\mathcal{W}` is linear in each expert mode; the other
        coefficients are not renormalised.  Edits nest (scales multiply),
        and each block restores what it found.  :func:`mumoe.nn.edit_experts`
        edits every layer of a model this way.  An edit applies to every
        thread's calls while it lasts, and a layer is edited by one thread at
        a time: another thread's edit raises ``RuntimeError`` (two overlapping
        blocks could otherwise leave the layer edited for good).

        Parameters
        ----------
        level : int
            The expert level (0-based).
        scales : array-like, shape (N_level,)
            Converted to a float64 tensor on the layer's device.

        Raises
        ------
        ValueError
            If ``level`` is out of range or ``scales`` has the wrong shape.
        RuntimeError
            If another thread is editing this layer.

        Examples
        --------
        >>> import torch
        >>> from mumoe.nn import CPMuMoE
        >>> layer = CPMuMoE(8, 3, expert_dims=4, rank=2).eval()
        >>> with layer.scaled_experts(0, [0.0, 0.0, 0.0, 0.0]):  # every expert off
        ...     layer(torch.randn(5, 8)).abs().max().item()
        0.0
        """
        level = check_level(level, self.network)
        n = self.network.expert_dims[level]
        weight = next(iter(self.parameters()), None)
        device = None if weight is None else weight.device
        vector = torch.as_tensor(scales, dtype=torch.float64, device=device)
        if tuple(vector.shape) != (n,):
            raise ValueError(
                f"scales for level {level} must have shape ({n},), got {tuple(vector.shape)}"
            )
        dtype = torch.float64 if weight is None else weight.dtype
        check_scales(vector.cpu().numpy(), f"scales for level {level}", dtype)
        me = threading.get_ident()
        with _EDITS:  # check and take ownership at once
            owner, depth = self.__dict__.get("_edit_owner") or (me, 0)
            if owner != me:
                raise RuntimeError(
                    "another thread is editing this layer's experts; a layer is edited by "
                    "one thread at a time (scaled_experts, mumoe.nn.edit_experts)"
                )
            self.__dict__["_edit_owner"] = (me, depth + 1)
        previous = self._expert_scales
        if level in previous:
            vector = previous[level] * vector
        self._expert_scales = {**previous, level: vector}
        try:
            yield
        finally:
            self._expert_scales = previous
            with _EDITS:
                self.__dict__["_edit_owner"] = (me, depth) if depth else None

    def forward(
        self,
        x: torch.Tensor,
        gates: Sequence[torch.Tensor] | torch.Tensor | None = None,
        *,
        return_gates: bool = False,
        scales: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Mix the experts for input ``x``: :func:`mumoe.functional.layer_forward`.

        Parameters
        ----------
        x : torch.Tensor, shape (..., I)
        gates : sequence of torch.Tensor (..., N_e) or SparseGate, optional
            Coefficients to use instead of the layer's gate (required when
            the layer has none), dense or as supports
            (:class:`~mumoe.typing.SparseGate`); a single one with one
            expert level.
        return_gates : bool, default False
            Also return the coefficients used, as dense tensors (the gate
            hands levels of small support to the contraction as
            :class:`~mumoe.typing.SparseGate`; they are made dense here).
        scales : mapping of level to torch.Tensor (N_e,), optional
            Factors per expert for this call, on top of any
            :meth:`scaled_experts` edit in force.

        Returns
        -------
        torch.Tensor, shape (..., O)
            And the list of gates when ``return_gates`` (before any edit).

        Examples
        --------
        >>> import torch
        >>> layer = MuMoE(8, 4, "tr", expert_dims=(6, 2), rank=2)
        >>> y, gates = layer(torch.randn(3, 5, 8), return_gates=True)
        >>> y.shape, [tuple(a.shape) for a in gates]
        (torch.Size([3, 5, 4]), [(3, 5, 6), (3, 5, 2)])
        """
        network, cores = self._weights(dropout=self.training)
        check_input(x, self.in_features, cores[0])
        if gates is not None:
            check_gate_devices(gates, x)
        edits = self._expert_scales
        if scales:
            edits = {e: edits[e] * s if e in edits else s for e, s in {**edits, **scales}.items()}
        if edits:
            edits = {e: s.to(x) for e, s in edits.items()}
        # Submodules from the dict, not through nn.Module.__getattr__ (see _weights).
        modules = self._modules
        # A network of another rank (tensor dropout) contracts with its default planner.
        planner = self.__dict__["_planner"] if network is self.network else None
        gate: Any = modules.get("gate") if gates is None else None
        if gate is not None:
            # Levels whose support is within the crossover come as supports (SparseGate).
            sparsified = gate.support is None  # not a top-k gate: its output is sparsified
            density = gate_density(planner or resolve_planner(network), x, cores, sparsified)
            if density > 0:
                gate = functools.partial(gate, max_density=density)
        elif gates is not None:  # a caller's supports: their indices checked once, here
            with thread_backend("pytorch"):
                check_support_indices(gates if isinstance(gates, list | tuple) else [gates])
        with thread_backend("pytorch"):
            y, coefficients = layer_forward(
                network,
                cores,
                x,
                gate=gate,
                gates=gates,
                input_norm=modules.get("input_norm"),
                scales=edits,
                planner=planner,
                contract=module_contract,
            )
        if not return_gates:
            return y
        with thread_backend("pytorch"):
            return y, functional.dense_gates(coefficients)

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

    def get_config(self) -> dict[str, Any]:
        """The layer's constructor settings as JSON (class, sizes, network, gate, dtype).

        Returns
        -------
        dict
            :meth:`from_config` builds the layer back from it.

        Raises
        ------
        TypeError
            For a subclass mumoe does not know, or a layer whose cores live
            elsewhere (:class:`mumoe.nn.FactorizedMuMoE`).
        ValueError
            For a custom activation callable or gate norm.

        Examples
        --------
        >>> from mumoe.nn import CPMuMoE
        >>> config = CPMuMoE(8, 4, expert_dims=6, rank=2).get_config()
        >>> config["class"], config["network"]["rank"], config["gate"]["activation"]
        ('CPMuMoE', {'r': 2}, 'entmax15')
        """
        name = type(self).__name__
        if LAYER_CLASSES.get(name) is not type(self) or not self._owns_cores:
            raise TypeError(
                f"{type(self).__qualname__} has no configuration: one of "
                f"{', '.join(LAYER_CLASSES)} whose cores are its own parameters has"
            )
        return layer_config(self, name)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        where: str = "",
    ) -> MuMoE:
        """A freshly initialised layer of the class and shapes ``config`` describes.

        Parameters
        ----------
        config : mapping
            As :meth:`get_config` gives it (read from JSON): of this class or
            a subclass (``MuMoE.from_config`` builds a ``CPMuMoE``'s).
        device : torch.device or str, optional
        dtype : torch.dtype, optional
            Of the parameters; by default the configuration's.
        where : str, optional
            Named in messages (the file).

        Returns
        -------
        MuMoE

        Raises
        ------
        ValueError
            If a field is missing, unknown, mistyped or invalid, or the
            configuration is of another class; the message names it.

        Examples
        --------
        >>> from mumoe.nn import TRMuMoE
        >>> layer = TRMuMoE(8, 4, expert_dims=6, rank=(2, 2, 3))
        >>> rebuilt = MuMoE.from_config(layer.get_config())
        >>> type(rebuilt).__name__, rebuilt.network == layer.network
        ('TRMuMoE', True)
        """
        where = where or f"of a {cls.__name__}"
        name = config_field(config, "class", str, where)
        target = LAYER_CLASSES.get(name)
        if target is None or not issubclass(target, cls):
            raise config_error(where, f"holds a {name}, not a {cls.__name__}")
        keys = {"class", "in_features", "out_features", "network", "gate", "input_norm", "dtype"}
        known_fields(config, keys, where)
        sizes = (
            config_size(config, "in_features", where),
            config_size(config, "out_features", where),
        )
        network = network_from_config(config.get("network"), *sizes, f"{where}, network")
        gate = config.get("gate")
        options = {} if gate is None else gate_options(gate, f"{where}, gate")
        options["input_norm"] = config_field(config, "input_norm", bool, where)
        layer = target.__new__(target)
        try:  # a preset class's own __init__ takes a format's rank; the network is exact
            MuMoE.__init__(
                layer,
                *sizes,
                network,
                bias=network.bias,
                gated=gate is not None,
                **options,
                device=device,
                dtype=dtype or config_dtype(config, where),
            )
        except (TypeError, ValueError) as error:  # a top_k or balance the layer refuses
            raise config_error(where, str(error)) from error
        return layer

    def extra_repr(self) -> str:
        """Sizes and options, for ``repr``."""
        net = self.network
        rank = f", rank={dict(net.ranks)}" if net.ranks else ""
        if net.splits_input:
            rank += f", in_shape={net.in_shape}"
        if net.splits_output:
            rank += f", out_shape={net.out_shape}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"network={net.format!r}, spec={net.spec!r}, expert_dims={net.expert_dims}"
            f"{rank}, bias={net.bias}, init={self.init_scheme!r}, params={net.n_params:,}"
        )


#: The layer classes a configuration may name, by name: MuMoE, and the classes of one
#: format each, which mumoe.nn._preset_layers adds.
LAYER_CLASSES: dict[str, type[MuMoE]] = {"MuMoE": MuMoE}
