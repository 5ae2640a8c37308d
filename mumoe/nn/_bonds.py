r"""Rank regularisation on any bond: tensor dropout, a lasso on its components, and pruning.

A bond is a leg no role names (CP's ``r``, TT's ``r1``, a custom spec's
``a``); its components are its indices, each a rank-one term of the sum the
contraction makes over it.  :func:`regularize_bonds` gives every μMoE layer of
a module a :class:`BondRegularizer`, an opt-in training setting like
``balance=``: in training each chosen bond's components are dropped with
probability :math:`p` and the kept ones scaled by :math:`1/(1-p)` (tensor
dropout, Kolbeinsson et al. 2021), and a lasso weight :math:`\lambda_r`
multiplies each component, :math:`c \sum_r |\lambda_r|` being the layer's
``aux_loss`` (:func:`mumoe.nn.collect_aux_losses` sums it).  Both act on one
core holding the bond, scaled along it, so every format and custom network
has them.  :func:`prune_bonds` folds the weights into the cores and removes
the components of small norm, shrinking the cores and the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mumoe.nn._layers import MuMoE
from mumoe.nn._surgery import _same_policy
from mumoe.spec import Network

__all__ = ["BondRegularizer", "PruneReport", "component_norms", "prune_bonds", "regularize_bonds"]


def _check_bonds(network: Network, chosen: Iterable[str], what: str) -> None:
    unknown = sorted(set(chosen) - set(network.bonds))
    if unknown:
        raise ValueError(
            f"{what}: {unknown} are not bonds of {network.spec!r}, whose bonds are "
            f"{list(network.bonds) or 'none (a network without bonds has no rank to regularise)'}"
        )


def _slice_norms(core: torch.Tensor, axis: int) -> torch.Tensor:
    return core.movedim(axis, 0).reshape(core.shape[axis], -1).norm(dim=1)


def _along(vector: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def component_norms(network: Network, cores: Sequence[torch.Tensor], bond: str) -> torch.Tensor:
    """Each component's norm: the product, over the cores holding the bond, of its slices' norms.

    0 exactly where any factor of the component's term is 0.

    Parameters
    ----------
    network : Network
    cores : sequence of torch.Tensor
    bond : str

    Returns
    -------
    torch.Tensor, shape (rank,)
        Detached, in the cores' dtype.

    Examples
    --------
    >>> import mumoe, torch
    >>> net = mumoe.tt(4, 2, expert_dims=3, rank=(2, 2))
    >>> component_norms(net, [torch.ones(s) for s in net.core_shapes], "r1")  # (3,) x (2, 5, 2)
    tensor([5.4772, 5.4772])
    """
    norms = None
    for legs, core in zip(network.core_legs, cores, strict=True):
        if bond in legs:
            slices = _slice_norms(core.detach(), legs.index(bond))
            norms = slices if norms is None else norms * slices
    if norms is None:
        raise ValueError(f"no core of {network.spec!r} holds the bond {bond!r}")
    return norms


class BondRegularizer(nn.Module):
    r"""Tensor dropout and a lasso on chosen bonds of one μMoE layer's network.

    Parameters
    ----------
    network : Network
        The layer's network; the bonds named below must be its.
    dropout : mapping {bond: p}, optional
        In training, each component of the bond dropped with probability
        ``p`` in [0, 1) (one kept at least), the kept ones scaled by
        ``1 / (1 - p)``; one draw a forward pass.
    lasso : mapping {bond: coefficient}, optional
        A weight per component, and ``coefficient * sum |weight|`` as
        :attr:`aux_loss`: each core's slices along the bond are normalised
        and the weights carry the components' magnitudes (weight
        normalisation), so growing the cores that hold the bond does not
        escape the lasso (scale moved into other cores can ease it: add
        weight decay); the weights start at the components' norms, so the
        layer's function is unchanged.
    cores : sequence of torch.Tensor, optional
        The layer's cores, for the weights' start (needed with ``lasso``).
    start_zero : mapping {bond: bool tensor (rank,)}, optional
        Components whose weights start at 0 (:func:`regularize_bonds`: those
        of norm 0, whose zero slices it gives random directions, so that the
        lasso's gradient can grow them; the function is unchanged).

    Attributes
    ----------
    weights : torch.nn.ParameterDict
        The lasso weights by bond, each ``(rank,)``.
    aux_loss : torch.Tensor or None
        The lasso penalty (None without a lasso).

    Examples
    --------
    >>> import mumoe
    >>> import torch
    >>> net = mumoe.cp(8, 4, expert_dims=6, rank=3)
    >>> cores = [torch.ones(s) for s in net.core_shapes]
    >>> regularizer = BondRegularizer(net, cores, lasso={"r": 0.1})
    >>> regularizer.weights["r"].detach()  # each component's norm: sqrt(6 * 9 * 4)
    tensor([14.6969, 14.6969, 14.6969])
    """

    def __init__(
        self,
        network: Network,
        cores: Sequence[torch.Tensor] | None = None,
        *,
        dropout: Mapping[str, float] | None = None,
        lasso: Mapping[str, float] | None = None,
        start_zero: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        dropout, lasso = dict(dropout or {}), dict(lasso or {})
        _check_bonds(network, [*dropout, *lasso], "regularize_bonds")
        for bond, p in dropout.items():
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
                raise ValueError(f"dropout[{bond!r}] must be a probability in [0, 1), got {p!r}")
        for bond, c in lasso.items():
            if isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c < math.inf:
                raise ValueError(f"lasso[{bond!r}] must be a coefficient >= 0, got {c!r}")
        if not dropout and not lasso:
            raise ValueError("regularize_bonds needs dropout= or lasso= on at least one bond")
        self.dropout = {bond: float(p) for bond, p in dropout.items()}
        self.lasso = {bond: float(c) for bond, c in lasso.items()}
        if self.lasso and cores is None:
            raise ValueError("a lasso starts its weights at the components' norms: give cores")
        self.weights = nn.ParameterDict()
        # Bonds sharing a core are normalised one after the other, as forward does: each
        # weight starts at the norms of the cores as the bonds before it left them.
        scaled = [c.detach() for c in cores or ()]
        for bond in self.lasso:
            norms = component_norms(network, scaled, bond)
            if start_zero is not None and bond in start_zero:
                norms = torch.where(start_zero[bond].to(norms.device), 0.0, norms)
            self.weights[bond] = nn.Parameter(norms)
            scaled = self._normalised(network, scaled, bond)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The lasso penalty, ``sum over bonds of coefficient * sum |weights|``; None without.

        Computed when read (it depends on the weights only), so it is never stale
        and a copy of the layer carries no graph.

        Examples
        --------
        >>> import mumoe, torch
        >>> net = mumoe.cp(8, 4, expert_dims=6, rank=3)
        >>> cores = [torch.ones(s) for s in net.core_shapes]
        >>> regularizer = BondRegularizer(net, cores, lasso={"r": 0.1})
        >>> round(float(regularizer.aux_loss.detach()), 3)  # 0.1 * 3 components of norm 14.7
        4.409
        """
        if not self.lasso:
            return None
        return torch.stack([c * self.weights[b].abs().sum() for b, c in self.lasso.items()]).sum()

    def masks(self, network: Network, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dropout factors of one pass by bond: 0 or ``1 / (1 - p)`` a component.

        Parameters
        ----------
        network : Network
        like : torch.Tensor
            For the device and dtype.

        Returns
        -------
        dict of str to torch.Tensor, each (rank,)
            Empty outside training.

        Examples
        --------
        >>> import mumoe, torch
        >>> net = mumoe.cp(8, 4, expert_dims=6, rank=3)
        >>> BondRegularizer(net, dropout={"r": 0.5}).eval().masks(net, torch.ones(1))
        {}
        """
        if not self.training:
            return {}
        masks = {}
        for bond, p in self.dropout.items():
            if p > 0:
                draws = torch.rand(network.ranks[bond], device=like.device)
                keep = draws >= p
                keep[draws.argmax()] = True  # one component at least: a bond is never cut
                masks[bond] = keep.to(like.dtype) / (1 - p)
        return masks

    def forward(
        self, network: Network, cores: list[torch.Tensor], *, dropout: bool = False
    ) -> list[torch.Tensor]:
        """The cores as the regularised layer computes with them.

        With a lasso on a bond, every core's slices along it are normalised
        and the first core holding it multiplied by the weights; with
        ``dropout`` in training, the first core holding a bond multiplied by
        a fresh mask (the layer's forward pass asks for it; views such as
        ``materialize`` do not).

        Parameters
        ----------
        network : Network
        cores : list of torch.Tensor
        dropout : bool, default False

        Returns
        -------
        list of torch.Tensor
            The cores not touched as they were (not copies).

        Examples
        --------
        >>> import mumoe, torch
        >>> net = mumoe.cp(8, 4, expert_dims=6, rank=3)
        >>> cores = [torch.randn(s) for s in net.core_shapes]
        >>> same = BondRegularizer(net, cores, lasso={"r": 0.1})(net, cores)
        >>> with mumoe.backends.thread_backend("pytorch"):
        ...     w, v = mumoe.materialize(net, same), mumoe.materialize(net, cores)
        >>> torch.allclose(w, v, atol=1e-5)
        True
        """
        scaled = list(cores)
        for bond in self.weights:
            scaled = self._normalised(network, scaled, bond)
        masks = self.masks(network, scaled[0]) if dropout else {}
        for bond, mask in masks.items():
            k = next(k for k, legs in enumerate(network.core_legs) if bond in legs)
            axis = network.core_legs[k].index(bond)
            scaled[k] = scaled[k] * _along(mask.to(scaled[k].dtype), scaled[k].dim(), axis)
        return scaled

    def _normalised(
        self, network: Network, cores: list[torch.Tensor], bond: str
    ) -> list[torch.Tensor]:
        # Every core's slices along the bond normalised, the first core's times the weights.
        scaled, first = list(cores), True
        for k, legs in enumerate(network.core_legs):
            if bond not in legs:
                continue
            axis = legs.index(bond)
            norms = _slice_norms(scaled[k], axis).clamp_min(torch.finfo(scaled[k].dtype).tiny)
            factor = 1 / norms
            if first and bond in self.weights:
                factor = factor * self.weights[bond].to(factor.dtype)
                first = False
            scaled[k] = scaled[k] * _along(factor, scaled[k].dim(), axis)
        return scaled

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, lasso={self.lasso}"


def _layers(module: nn.Module, what: str) -> list[tuple[str, MuMoE]]:
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, MuMoE)]
    if not layers:
        raise TypeError(f"{type(module).__qualname__} holds no mumoe.nn.MuMoE layer to {what}")
    for name, layer in layers:
        if not layer._owns_cores:
            raise TypeError(
                f"{name or type(layer).__qualname__} takes its cores from a tensorly-torch "
                "tensor; use that tensor's own dropout and lasso"
            )
    return layers


def regularize_bonds(
    module: nn.Module,
    *,
    dropout: Mapping[str, float] | None = None,
    lasso: Mapping[str, float] | None = None,
) -> nn.Module:
    """Give every μMoE layer of ``module`` tensor dropout and a lasso on the bonds named.

    Each layer gets a :class:`BondRegularizer` (its submodule
    ``bond_regularizer``: the lasso weights train with the layer, so build
    the optimiser after this call), on the device and dtype of its cores.
    Its function is unchanged (up to rounding) until training moves it.  A
    layer with a regularizer describes no configuration (``get_config``
    refuses it): :func:`prune_bonds` folds the weights into the cores and
    removes the regularizer.

    Parameters
    ----------
    module : torch.nn.Module
        A layer, a block, or a model holding them.
    dropout, lasso : mapping {bond: value}, optional
        As for :class:`BondRegularizer`; the bonds must be every layer's.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.

    Raises
    ------
    TypeError
        If ``module`` holds no μMoE layer, or a layer takes its cores from a
        tensorly-torch tensor.
    ValueError
        For a bond a layer lacks (the message lists its bonds), a probability
        outside [0, 1), a negative coefficient, or a layer regularised already;
        no layer is changed then.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import TTMuMoE, collect_aux_losses
    >>> layer = regularize_bonds(TTMuMoE(16, 8, expert_dims=4, rank=(4, 6)), lasso={"r2": 0.01})
    >>> loss = layer(torch.randn(3, 16)).square().mean() + collect_aux_losses(layer)
    >>> weights = layer.bond_regularizer.weights["r2"]  # the components' norms
    >>> bool(torch.isclose(collect_aux_losses(layer), 0.01 * weights.abs().sum()))
    True
    """
    layers = _layers(module, "regularize")
    built = {}
    for name, layer in layers:
        if layer._modules.get("bond_regularizer") is not None:
            raise ValueError(
                f"{name or type(layer).__name__} is regularised already; prune_bonds folds "
                "its weights in and removes the regularizer"
            )
        try:
            with torch.no_grad():
                _check_bonds(layer.network, [*(lasso or {})], "regularize_bonds")
                cores, dead = _revived(layer.network, list(layer.cores), list(lasso or {}))
                regularizer = BondRegularizer(
                    layer.network, cores, dropout=dropout, lasso=lasso, start_zero=dead
                )
        except ValueError as error:
            raise ValueError(f"{name or type(layer).__name__}: {error}") from error
        built[name] = (regularizer, cores)
    for name, layer in layers:
        regularizer, cores = built[name]
        with torch.no_grad():
            for core, start in zip(layer.cores, cores, strict=True):
                core.copy_(start)
        layer.bond_regularizer = regularizer
    return module


def _revived(
    network: Network, cores: list[torch.Tensor], bonds: list[str]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The cores with each zero slice of a zero component given a random unit direction.

    A component of norm 0 (TT's start, a zero-padded fit) would have a zero
    weight and zero slices, so no gradient could ever grow it; with random
    directions and a zero weight it computes nothing yet can learn.
    """
    cores = [c.detach().clone() for c in cores]
    dead = {}
    for bond in bonds:
        zero = component_norms(network, cores, bond) == 0
        dead[bond] = zero
        if not zero.any():
            continue
        for k, legs in enumerate(network.core_legs):
            if bond not in legs:
                continue
            axis = legs.index(bond)
            empty = zero & (_slice_norms(cores[k], axis) == 0)
            noise = torch.randn_like(cores[k]).movedim(axis, 0)
            noise = noise / noise.reshape(noise.shape[0], -1).norm(dim=1).reshape(
                -1, *[1] * (noise.dim() - 1)
            )
            moved = cores[k].movedim(axis, 0)
            moved[empty] = noise[empty]
    return cores, dead


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune_bonds` removed.

    Parameters
    ----------
    ranks : dict of str to (dict, dict)
        Per layer (by qualified name, ``""`` for the module itself), its bond
        sizes before and after.
    params_before, params_after : int
        The layers' core parameters.

    Examples
    --------
    >>> PruneReport({"": ({"r": 8}, {"r": 5})}, 120, 75).ranks[""][1]
    {'r': 5}
    """

    ranks: dict[str, tuple[dict[str, int], dict[str, int]]]
    params_before: int
    params_after: int


def prune_bonds(
    module: nn.Module,
    *,
    threshold: float | None = None,
    keep: int | Mapping[str, int] | None = None,
    bonds: Iterable[str] | None = None,
) -> PruneReport:
    """Remove each bond's components of small norm from every μMoE layer, shrinking the cores.

    A layer's :class:`BondRegularizer` is first folded into its cores (as the
    layer computes in eval mode: normalised slices times the lasso weights)
    and removed.  A component's norm is the product, over the cores holding
    the bond, of its slice's Frobenius norm (:func:`component_norms`; with a
    lasso on a bond whose cores no other lasso'd bond shares, its weight's
    magnitude): 0 exactly where the term is 0, so
    removing those keeps the layer's function exactly, and a lasso drives
    the components a layer does not need towards 0.  The kept components
    keep their order; the network's ranks, the parameter count and the plans
    follow, with the layer's planner policy.
    The cores of a layer that changes are new parameters: build the optimiser
    again (a layer with nothing to prune and no regularizer keeps its own).

    Parameters
    ----------
    module : torch.nn.Module
        A layer, a block, or a model holding them.
    threshold : float, optional
        Remove the components whose norm is at most this.
    keep : int or mapping {bond: int}, optional
        Keep this many components of largest norm (per bond).  Exactly one of
        ``threshold`` and ``keep``.
    bonds : iterable of str, optional
        The bonds to prune; by default the ones regularised, or every bond.

    Returns
    -------
    PruneReport

    Raises
    ------
    ValueError
        If both or neither of ``threshold`` and ``keep`` are given, a bond is
        not a layer's, or a bond would keep no component; nothing is changed
        then.
    TypeError
        If ``module`` holds no μMoE layer that owns its cores.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import CPMuMoE
    >>> layer = CPMuMoE(16, 8, expert_dims=4, rank=6).eval()
    >>> with torch.no_grad():
    ...     layer.cores[0][:, 4:] = 0.0  # two components that contribute nothing
    >>> x = torch.randn(3, 16)
    >>> before = layer(x)
    >>> prune_bonds(layer, threshold=0.0).ranks[""]
    ({'r': 6}, {'r': 4})
    >>> torch.allclose(layer(x), before, atol=1e-6)
    True
    """
    if (threshold is None) == (keep is None):
        raise ValueError("give exactly one of threshold= and keep=")
    if threshold is not None and (isinstance(threshold, bool) or not threshold >= 0):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    layers = _layers(module, "prune")
    plans = []
    for name, layer in layers:
        network = layer.network
        regularizer = layer._modules.get("bond_regularizer")
        assert regularizer is None or isinstance(regularizer, BondRegularizer)
        with torch.no_grad():  # folded as the layer computes in eval mode (no mode switch)
            cores = [c.detach() for c in layer.cores]
            if regularizer is not None:
                cores = regularizer(network, cores, dropout=False)
        chosen = list(bonds) if bonds is not None else None
        if chosen is None:
            chosen = (
                [*regularizer.dropout, *regularizer.weights]
                if regularizer is not None
                else list(network.bonds)
            )
            chosen = list(dict.fromkeys(chosen))
        where = name or type(layer).__name__
        _check_bonds(network, chosen, f"prune_bonds on {where}")
        if isinstance(keep, Mapping) and not set(keep) <= set(chosen):
            raise ValueError(
                f"keep names {sorted(set(keep) - set(chosen))}, which prune_bonds does not "
                f"prune on {where} (it prunes {chosen})"
            )
        sizes = dict(network.ranks)
        for bond in chosen:
            norms = component_norms(network, cores, bond).double()
            if threshold is not None:
                kept = torch.nonzero(norms > threshold).flatten()
            else:
                count = keep.get(bond, sizes[bond]) if isinstance(keep, Mapping) else keep
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise ValueError(f"keep must be a positive int, got {count!r} for {bond!r}")
                kept = torch.sort(torch.argsort(norms, descending=True, stable=True)[:count]).values
            if kept.numel() == 0:
                raise ValueError(
                    f"pruning bond {bond!r} of {where} at threshold {threshold} keeps no "
                    f"component (its largest norm is {float(norms.max()):.3g}): a bond needs one"
                )
            if kept.numel() < sizes[bond]:
                for k, legs in enumerate(network.core_legs):
                    if bond in legs:
                        index = kept.to(cores[k].device)
                        cores[k] = cores[k].index_select(legs.index(bond), index)
            sizes[bond] = int(kept.numel())
        if sizes == dict(network.ranks) and regularizer is None:
            continue  # nothing to change: the layer keeps its parameters
        shrunk = network.replace(rank=sizes)
        plans.append((name, layer, cores, shrunk, _same_policy(layer.planner, shrunk)))
    ranks = {name: (dict(layer.network.ranks),) * 2 for name, layer in layers}
    before = sum(layer.network.n_params for _, layer in layers)
    for name, layer, cores, shrunk, planner in plans:
        ranks[name] = (dict(layer.network.ranks), dict(shrunk.ranks))
        for k, core in enumerate(cores):
            old = layer.cores[k]
            fresh = core.detach().clone(memory_format=torch.contiguous_format)
            layer.cores[k] = nn.Parameter(fresh, requires_grad=old.requires_grad)
        layer.network = shrunk
        layer.planner = planner
        if "bond_regularizer" in layer._modules:
            del layer._modules["bond_regularizer"]
    after = sum(layer.network.n_params for _, layer in layers)
    return PruneReport(ranks, before, after)
