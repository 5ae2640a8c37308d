"""From a layer's arguments to its network: :func:`build_network`.

A layer is given a :class:`~mumoe.spec.Network`, a format name or a spec
string, sizes, and a rank or a parameter budget; this is the one place that
turns them into a network.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from mumoe.spec._budget import as_budget, match_rank
from mumoe.spec._formats import FORMATS
from mumoe.spec._network import Network
from mumoe.spec._presets import _build, ttm_shapes
from mumoe.typing import RankOrBudget

__all__ = ["build_network"]


def build_network(
    in_features: int,
    out_features: int,
    network: Network | str,
    *,
    expert_dims: int | Sequence[int] | None = None,
    rank: RankOrBudget | None = None,
    bias: bool = True,
    count_gates: bool = True,
    gate_bias: bool = False,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
) -> Network:
    """The network of a layer, from a Network, a format name or a spec string.

    The one place that turns a layer's arguments into its network: the
    PyTorch layers, the compatibility layer and ``mumoe describe`` call it.

    Parameters
    ----------
    in_features, out_features : int
    network : Network or str
        A :class:`~mumoe.Network` (whose sizes must agree and which then
        takes no ``expert_dims``/``rank``), a format name (``"cp"``,
        ``"tucker"``, ``"tt"``, ``"tr"``, ``"dense"``) or a spec string.
    expert_dims : int or sequence of int
        Experts per level; required with a format or a spec.
    rank : int, tuple, mapping, "same" or Budget
        The format's or spec's rank.  With a format, a
        :class:`~mumoe.spec.Budget` (``"same"`` is ``Budget(1.0)``) chooses
        the rank by :func:`mumoe.spec.match_rank`: the parameters of
        ``nn.Linear(in_features, out_features)``, a fraction of them or a
        count.  A bare float is refused (``TypeError``): a budget is a
        :class:`~mumoe.spec.Budget`.
    bias : bool, default True
    count_gates : bool, default True
        Whether a budget counts the gate projections.
    gate_bias : bool, default False
        Whether a budget counts a gate bias as well.
    in_shape, out_shape : sequence of int, optional
        The legs of a split input and output (a spec's ``i1 ... iK``, or a
        format split so; see :class:`~mumoe.spec.Network`).  With a Network,
        they must be its own or absent.

    Returns
    -------
    Network

    Raises
    ------
    TypeError
        If ``network`` is neither a Network nor a string.
    ValueError
        If sizes disagree with a given Network, ``expert_dims`` is missing, a
        format needs a rank that is missing (or has none and one is given),
        or a budget is given for a spec string.

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
        for name, given in (("in_shape", in_shape), ("out_shape", out_shape)):
            own = getattr(network, name)
            if given is not None and tuple(given) != own:
                raise ValueError(
                    f"network has {name}={own} but the layer was given {name}={tuple(given)}"
                )
        return network
    if not isinstance(network, str):
        raise TypeError(
            f"network must be a Network, a format name or a spec string, got {network!r}"
        )
    record = FORMATS.get(network)
    if record is None and len(network.split()) == 1 and "," not in network:
        # One word is never a spec (a core holds at least the legs n, i and o).
        close = difflib.get_close_matches(network.lower(), FORMATS, n=1)
        raise ValueError(
            f"network {network!r} is neither a format name ({', '.join(map(repr, FORMATS))}"
            f"{f'; did you mean {close[0]!r}?' if close else ''}) nor a spec (cores of "
            "legs such as 'n r, i r, o r')"
        )
    if expert_dims is None:
        raise ValueError(f"network {network!r} needs expert_dims (experts per level)")
    budget = as_budget(rank)
    if record is not None:
        if record.has_rank and rank is None:
            raise ValueError(
                f"the {network} network needs a rank (an int, 'same' or a mumoe.Budget)"
            )
        if budget is not None:
            rank = match_rank(
                network,
                in_features,
                out_features,
                expert_dims=expert_dims,
                budget=budget,
                bias=bias,
                gates=count_gates,
                gate_bias=gate_bias,
                in_shape=in_shape,
                out_shape=out_shape,
            )
        if network == "ttm":
            in_shape, out_shape = ttm_shapes(in_features, out_features, in_shape, out_shape)
        return _build(
            network,
            in_features,
            out_features,
            expert_dims,
            rank,  # type: ignore[arg-type]
            bias=bias,
            in_shape=in_shape,
            out_shape=out_shape,
        )
    if budget is not None:
        raise ValueError(
            "a parameter budget ('same' or a mumoe.Budget) chooses the rank of a format only; "
            "give a spec string its bond sizes"
        )
    if rank is not None and not isinstance(rank, int | Mapping):
        raise TypeError(
            f"the rank of a spec string is an int or a mapping of bond sizes, got {rank!r}"
        )
    return Network(
        network,
        in_features,
        out_features,
        expert_dims=expert_dims,
        rank=rank,
        bias=bias,
        in_shape=in_shape,
        out_shape=out_shape,
    )
