r"""tensorly-torch interop: μMoE layers whose weights are a ``tltorch.FactorizedTensor``.

A CP, Tucker or TT ``FactorizedTensor`` of shape ``(N_1, ..., N_E, I', O)``
(``I' = I + 1`` with a bias) is a μMoE weight tensor.
:class:`FactorizedMuMoE` holds one as its ``weight`` and reads its cores from
``weight()`` on every forward, so tensorly-torch's tools act on the layer:
``tltorch.tensor_dropout(layer.weight, p)`` drops rank components while
training, ``tltorch.tensor_lasso`` penalises them, and ``layer.weight.normal_()``
or ``tltorch.tensor_init`` re-initialise them.  :func:`to_factorized_tensor`
exports the cores of any CP, Tucker or TT layer as such a tensor.

Importing tensorly-torch sets TensorLy's backend to ``"pytorch"`` for the
whole process; mumoe imports it lazily and undoes that.  tensorly-torch's own
methods (``to_tensor``, ``normal_``, ``FactorizedTensor.new``) compute with
TensorLy and need its ``pytorch`` backend: set it, or call them inside
``mumoe.backends.thread_backend("pytorch")``.  The layers need neither.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from mumoe.backends import preserved_backend, thread_backend
from mumoe.nn._init import init_cores_
from mumoe.nn._layers import MuMoE
from mumoe.spec import Network, cp, preset_format, tt, tucker

__all__ = ["FactorizedMuMoE", "network_of", "to_factorized_tensor"]


def _tltorch() -> Any:
    with preserved_backend():
        import tltorch
    return tltorch


def network_of(tensor: Any, bias: bool = True) -> Network:
    """The preset network with the structure and sizes of a tltorch tensor.

    Parameters
    ----------
    tensor : tltorch.CPTensor, tltorch.TuckerTensor or tltorch.TTTensor
        Of shape ``(N_1, ..., N_E, I', O)``, ``E >= 1``.
    bias : bool, default True
        Whether the input mode's last slice is the bias (``I = I' - 1``).

    Returns
    -------
    Network

    Examples
    --------
    >>> from mumoe.backends import preserved_backend, thread_backend
    >>> with preserved_backend():  # importing tltorch would switch TensorLy's backend
    ...     import tltorch
    >>> with thread_backend("pytorch"):
    ...     tensor = tltorch.FactorizedTensor.new((32, 17, 10), rank=4, factorization="cp")
    >>> network_of(tensor)
    Network('n1 r, i r, o r', 16, 10, expert_dims=32, rank={'r': 4}, bias=True)
    """
    tltorch = _tltorch()
    shape = tuple(tensor.shape)
    if len(shape) < 3:
        raise ValueError(
            f"a μMoE weight tensor has shape (N_1, ..., N_E, I', O) with E >= 1, got {shape}"
        )
    *dims, n_in, n_out = shape
    in_features = n_in - int(bias)
    if isinstance(tensor, tltorch.CPTensor):
        return cp(in_features, n_out, expert_dims=dims, rank=tensor.rank, bias=bias)
    if isinstance(tensor, tltorch.TuckerTensor):
        return tucker(in_features, n_out, expert_dims=dims, rank=tuple(tensor.rank), bias=bias)
    if isinstance(tensor, tltorch.TTTensor):
        return tt(in_features, n_out, expert_dims=dims, rank=tuple(tensor.rank), bias=bias)
    raise TypeError(
        f"{type(tensor).__qualname__} is not supported: use a tltorch CPTensor, TuckerTensor "
        "or TTTensor"
    )


def _cores_of(tensor: Any) -> list[torch.Tensor]:
    # The factors of a tltorch tensor in the layout of mumoe's presets.
    tltorch = _tltorch()
    if isinstance(tensor, tltorch.CPTensor):
        first, *rest = tensor.factors
        return [first * tensor.weights, *rest]
    if isinstance(tensor, tltorch.TuckerTensor):
        return [*tensor.factors, tensor.core]
    factors = list(tensor.factors)
    factors[0] = factors[0].squeeze(0)
    factors[-1] = factors[-1].squeeze(-1)
    return factors


def _rank_key(tensor: Any) -> int | tuple[int, ...]:
    return tensor.rank if isinstance(tensor.rank, int) else tuple(tensor.rank)


class FactorizedMuMoE(MuMoE):
    r"""A μMoE layer whose weight tensor is a tensorly-torch ``FactorizedTensor``.

    Parameters
    ----------
    tensor : tltorch.CPTensor, tltorch.TuckerTensor or tltorch.TTTensor
        The weights, of shape ``(N_1, ..., N_E, I', O)``; kept as
        ``self.weight`` and used as is (pass ``init=True`` for the paper's
        initialisation).
    bias : bool, default True
        Whether the input mode's last slice is the experts' bias.
    init : bool, default False
        Initialise ``tensor`` in place as :class:`MuMoE` would.
    **options
        ``normalization``, ``activation``, ``input_norm``, ``gated``,
        ``device`` and ``dtype`` (of the gate), as for :class:`MuMoE`.

    Examples
    --------
    >>> import torch
    >>> from mumoe.backends import preserved_backend, thread_backend
    >>> with preserved_backend():  # importing tltorch switches TensorLy to pytorch
    ...     import tltorch
    >>> with thread_backend("pytorch"):
    ...     weight = tltorch.FactorizedTensor.new((16, 9, 4), rank=3, factorization="CP")
    >>> layer = FactorizedMuMoE(weight, init=True)
    >>> layer(torch.randn(5, 8)).shape
    torch.Size([5, 4])
    """

    _owns_cores = False

    def __init__(self, tensor: Any, *, bias: bool = True, init: bool = False, **options: Any):
        network = network_of(tensor, bias)
        super().__init__(network.in_features, network.out_features, network, bias=bias, **options)
        self.add_module("weight", tensor)
        self._rank = _rank_key(tensor)
        self._networks: OrderedDict[Any, Network] = OrderedDict()
        if init:
            self._init_weights_()

    @property
    def weight(self) -> Any:
        """The tensorly-torch tensor holding the cores (a submodule)."""
        try:
            return self._modules["weight"]
        except KeyError:  # during construction: not attached yet
            raise AttributeError("weight") from None

    def _init_weights_(self) -> None:
        weight = self._modules.get("weight")
        if weight is None:  # during MuMoE.__init__, before the tensor is attached
            self.init_scheme = "tensor's own"
            return
        tltorch = _tltorch()
        with torch.no_grad():
            if isinstance(weight, tltorch.CPTensor):
                weight.weights.fill_(1.0)
                cores = list(weight.factors)
            else:
                cores = _cores_of(weight)  # views: written in place
        self.init_scheme = init_cores_(self.network, cores)

    def _weights(self, *, dropout: bool = False) -> tuple[Network, list[torch.Tensor]]:
        # Calling the tensor runs tltorch's forward hooks (dropout, lasso), whatever
        # ``dropout`` (tltorch's own dropout acts in training).
        # Tensor dropout returns a tensor of lower rank: contract it with the
        # network of that rank, kept in a small LRU (each has its own plans).
        with thread_backend("pytorch"):  # tltorch computes with TensorLy
            tensor = self.weight()
        rank = _rank_key(tensor)
        if rank == self._rank:
            return self.network, _cores_of(tensor)
        network = self._networks.pop(rank, None) or network_of(tensor, self.network.bias)
        self._networks[rank] = network
        while len(self._networks) > 32:
            self._networks.popitem(last=False)
        return network, _cores_of(tensor)


def to_factorized_tensor(layer: MuMoE) -> nn.Module:
    """Export the cores of a CP, Tucker or TT layer as a tltorch ``FactorizedTensor``.

    The tensor holds copies of the cores: wrap it in :class:`FactorizedMuMoE`
    to train through it with tensorly-torch's tools.

    Parameters
    ----------
    layer : MuMoE
        A layer whose network has the structure of the ``cp``, ``tucker`` or
        ``tt`` preset, its input and output not split.

    Raises
    ------
    TypeError
        For another network, or one that splits its input or output.

    Returns
    -------
    tltorch.CPTensor, tltorch.TuckerTensor or tltorch.TTTensor
        Of shape ``layer.network.weight_shape``.

    Examples
    --------
    >>> from mumoe.nn import TuckerMuMoE
    >>> tensor = to_factorized_tensor(TuckerMuMoE(8, 4, expert_dims=16, rank=3))
    >>> type(tensor).__name__, tuple(tensor.shape)
    ('TuckerTensor', (16, 9, 4))
    """
    tltorch = _tltorch()
    network = layer.network
    if network.splits:
        raise TypeError(
            f"this layer splits its input or output ({network.spec!r}); the tensors exported "
            f"here have the shape (N..., I', O) with one input and one output mode"
        )
    fmt = preset_format(network)
    cores = [nn.Parameter(c.detach().clone()) for c in layer._weights()[1]]
    shape = network.weight_shape
    if fmt == "cp":
        cp_rank = network.ranks["r"]
        weights = nn.Parameter(torch.ones(cp_rank, dtype=cores[0].dtype, device=cores[0].device))
        return tltorch.CPTensor(weights, cores, shape=shape, rank=cp_rank)
    if fmt == "tucker":
        return tltorch.TuckerTensor(cores[-1], cores[:-1], shape=shape, rank=tuple(cores[-1].shape))
    if fmt == "tt":
        cores[0] = nn.Parameter(cores[0].detach().unsqueeze(0))
        cores[-1] = nn.Parameter(cores[-1].detach().unsqueeze(-1))
        tt_rank = (1, *(c.shape[-1] for c in cores[:-1]), 1)
        return tltorch.TTTensor(cores, shape=shape, rank=tt_rank)
    raise TypeError(
        f"tensorly-torch has CP, Tucker and TT tensors; this layer's network is "
        f"{fmt or 'a custom network'} ({network.spec!r})"
    )
