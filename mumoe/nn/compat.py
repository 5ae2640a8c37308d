r"""Drop-in replacements for the reference implementation's classes.

Code and checkpoints written for the paper's reference implementation
(``MuMoE.py`` of github.com/james-oldfield/muMoE: ``MuMoE``, ``CPMuMoE``,
``TRMuMoE``) work with mumoe after changing only the import line::

    from mumoe.nn.compat import MuMoE, CPMuMoE, TRMuMoE

The constructors take the reference's arguments, the modules have its
attribute names and ``state_dict`` keys (``MuMoE.factors.0``, ``projs.0``,
``bn.0.running_mean``, ``input_ln.weight``, ``MuMoE2.factors.0``, ...), its
initialisations, and its shapes: ``MuMoE`` returns ``(b, 1, o)`` for a 2-D
input, and the layers take ``(b, t, i)``.  The contractions are mumoe's, and
any ``hierarchy`` (number of expert levels) works, not only 1 and 2.

Differences, all deliberate:

* bad arguments raise ``ValueError`` where the reference fails later or not
  at all (a ``hierarchy`` that disagrees with ``expert_dims``, TR ranks that
  do not close the ring, an unknown ``normalization``);
* ``.to(torch.bfloat16)`` and ``.half()`` work: the gate computes in float32
  and its batch-norm statistics stay in float32, as in :mod:`mumoe.nn`
  (the reference fails in the batch norm).

As in the reference, ``MuMoE.a`` holds the coefficients of the last forward,
attached to the autograd graph in training (an auxiliary loss on the gates,
such as load balancing, gets their gradient); :func:`mumoe.nn.record_gates`
records them detached instead.  Each call computes with its own coefficients, so
one layer serves many threads (``.a`` is then the last call's to finish its gate).
Parameters and buffers are registered in the reference's order, so an optimizer
state saved with the reference resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mumoe.backends import thread_backend
from mumoe.functional import block_forward, layer_forward
from mumoe.nn._bridge import torch_forward
from mumoe.nn._gate import keep_statistics_wide, resolve_activation, torch_gate_coefficients
from mumoe.nn._init import init_cores_
from mumoe.spec import Network, cp, tr

__all__ = ["CPMuMoE", "MuMoE", "TRMuMoE"]


def _check_hierarchy(expert_dims: Sequence[int], hierarchy: int) -> list[int]:
    dims = list(expert_dims)
    if hierarchy != len(dims):
        raise ValueError(
            f"hierarchy={hierarchy} but expert_dims={dims} has {len(dims)} level(s); "
            "they must agree"
        )
    return dims


class _FactorisedLayer(nn.Module):
    """The reference layers' shared part: ``factors`` and ``forward(z, a)``."""

    network: Network

    def _build(self, network: Network) -> None:
        self.network = network
        self.use_bias = network.bias
        self.expert_dims = list(network.expert_dims)
        self.hierarchy = network.n_levels
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(shape)) for shape in network.core_shapes]
        )
        init_cores_(network, list(self.factors))

    def forward(self, z: torch.Tensor, a: Sequence[torch.Tensor]) -> torch.Tensor:
        """Contract input ``z`` with coefficients ``a``, as the reference's ``forward(z, a)``.

        Parameters
        ----------
        z : torch.Tensor, shape (b, t, i)
        a : sequence of torch.Tensor, each (b, t, n_e)

        Returns
        -------
        torch.Tensor, shape (b, t, o)

        Examples
        --------
        >>> import torch
        >>> layer = CPMuMoE(4, 8, [6, 2], 3, hierarchy=2)
        >>> a = [torch.softmax(torch.randn(2, 1, n), -1) for n in (6, 2)]
        >>> layer(torch.randn(2, 1, 4), a).shape
        torch.Size([2, 1, 8])
        """
        return torch_forward(self.network, list(self.factors), z, list(a))


class CPMuMoE(_FactorisedLayer):
    """The reference ``CPMuMoE(input_dim, output_dim, expert_dims, rank, use_bias, hierarchy)``.

    Parameters
    ----------
    input_dim, output_dim : int
        :math:`I` and :math:`O`.
    expert_dims : sequence of int
        Experts per level; its length must equal ``hierarchy``.
    rank : int
        The CP rank.
    use_bias : bool, default True
    hierarchy : int, default 1
        The number of expert levels.

    Examples
    --------
    >>> import torch
    >>> layer = CPMuMoE(4, 8, [32], 16)
    >>> a = [torch.softmax(torch.randn(2, 1, 32), -1)]
    >>> layer(torch.randn(2, 1, 4), a).shape
    torch.Size([2, 1, 8])
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        expert_dims: Sequence[int],
        rank: int,
        use_bias: bool = True,
        hierarchy: int = 1,
    ) -> None:
        super().__init__()
        dims = _check_hierarchy(expert_dims, hierarchy)
        self._build(cp(input_dim, output_dim, expert_dims=dims, rank=rank, bias=use_bias))


class TRMuMoE(_FactorisedLayer):
    """The reference ``TRMuMoE(input_dim, output_dim, expert_dims, ranks, act, ...)``.

    The full signature is ``TRMuMoE(input_dim, output_dim, expert_dims, ranks,
    act=None, use_bias=True, hierarchy=1)``.

    ``ranks`` lists each core's ``[r_left, size, r_right]``; the middle
    entries are ignored (the reference overwrites them with the sizes), and
    each core's right rank must equal the next core's left rank, the last
    closing the ring.  ``act`` is accepted and unused, as in the reference.

    Parameters
    ----------
    input_dim, output_dim : int
        :math:`I` and :math:`O`.
    expert_dims : sequence of int
        Experts per level; its length must equal ``hierarchy``.
    ranks : sequence of [r_left, size, r_right]
        One triple per core (experts..., input, output), as above.
    act : callable, optional
        Unused.
    use_bias : bool, default True
    hierarchy : int, default 1

    Examples
    --------
    >>> import torch
    >>> layer = TRMuMoE(4, 8, [32], [[4, 32, 4], [4, 4, 4], [4, 8, 4]])
    >>> [tuple(f.shape) for f in layer.factors]
    [(4, 32, 4), (4, 5, 4), (4, 8, 4)]
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        expert_dims: Sequence[int],
        ranks: Sequence[Sequence[int]],
        act: Callable[..., Any] | None = None,
        use_bias: bool = True,
        hierarchy: int = 1,
    ) -> None:
        super().__init__()
        dims = _check_hierarchy(expert_dims, hierarchy)
        ranks = [list(r) for r in ranks]
        if len(ranks) != len(dims) + 2 or any(len(r) != 3 for r in ranks):
            raise ValueError(
                f"ranks must list [r_left, size, r_right] for each of the {len(dims) + 2} cores "
                f"(experts..., input, output), got {ranks}"
            )
        for k, (core, following) in enumerate(zip(ranks, ranks[1:] + ranks[:1], strict=True)):
            if core[2] != following[0]:
                raise ValueError(
                    f"TR ranks must close the ring: ranks[{k}][2]={core[2]} != "
                    f"ranks[{(k + 1) % len(ranks)}][0]={following[0]}"
                )
        bonds = tuple(core[0] for core in ranks)
        self._build(tr(input_dim, output_dim, expert_dims=dims, rank=bonds, bias=use_bias))


def _default_act(logits: torch.Tensor) -> torch.Tensor:
    from entmax import entmax15

    return entmax15(logits, dim=-1)


class MuMoE(nn.Module):
    """The reference wrapper: gating, normalisation and an optional second layer.

    ``MuMoE(MuMoE_layer, input_dim, output_dim, expert_dims, ranks,
    second_dim=0, normalization='bn', act=entmax15, use_bias=True,
    hierarchy=1, apply_ln=False)``.

    Parameters
    ----------
    MuMoE_layer : type
        :class:`CPMuMoE` or :class:`TRMuMoE`.
    input_dim, output_dim : int
    expert_dims : list of int
    ranks : int or list of list of int
        The layer's rank (CP) or ranks (TR).
    second_dim : int, default 0
        If positive, a second layer ``output_dim -> second_dim`` after a GELU,
        driven by the same coefficients.
    normalization : {"bn", "ln"}, default "bn"
    act : callable, default entmax-1.5
    use_bias : bool, default True
    hierarchy : int, default 1
        The number of expert levels; must equal ``len(expert_dims)``.
    apply_ln : bool, default False
        Layer-normalise the input of the contraction (not of the gates).

    Examples
    --------
    >>> import torch
    >>> model = MuMoE(input_dim=4, output_dim=8, MuMoE_layer=CPMuMoE, expert_dims=[32], ranks=16)
    >>> model(torch.randn(5, 4)).shape
    torch.Size([5, 1, 8])
    """

    def __init__(
        self,
        MuMoE_layer: type[_FactorisedLayer],  # the reference's name
        input_dim: int,
        output_dim: int,
        expert_dims: Sequence[int],
        ranks: Any,
        second_dim: int = 0,
        normalization: str = "bn",
        act: Callable[[torch.Tensor], torch.Tensor] | str = _default_act,
        use_bias: bool = True,
        hierarchy: int = 1,
        apply_ln: bool = False,
    ) -> None:
        super().__init__()
        if normalization not in ("bn", "ln"):
            raise ValueError(f"normalization must be 'bn' or 'ln', got {normalization!r}")
        self.MuMoE = MuMoE_layer(
            input_dim, output_dim, expert_dims, ranks, use_bias=use_bias, hierarchy=hierarchy
        )
        self.expert_dims = list(expert_dims)
        self.normalization = normalization
        self.act = resolve_activation(act)
        self.second_dim = second_dim
        if second_dim > 0:
            self.MuMoE2 = MuMoE_layer(
                output_dim, second_dim, expert_dims, ranks, use_bias=use_bias, hierarchy=hierarchy
            )
            self.gelu = nn.GELU()
        # The reference's registration order (its parameters() order, which a saved
        # optimizer state depends on): the layers, input_ln, projs, the norms.
        self.input_ln: nn.Module = nn.LayerNorm(input_dim) if apply_ln else nn.Identity()
        self.projs = nn.ParameterList(
            [nn.Parameter(torch.zeros(input_dim, d)) for d in expert_dims]
        )
        if normalization == "bn":
            self.bn = nn.ModuleList([nn.BatchNorm1d(d, affine=False) for d in expert_dims])
        else:
            self.ln = nn.ModuleList(
                [nn.LayerNorm(d, elementwise_affine=False, bias=False) for d in expert_dims]
            )
        self.a: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate and mix the experts, as the reference's ``MuMoE.forward``.

        Parameters
        ----------
        x : torch.Tensor, shape (b, i) or (b, t, i)

        Returns
        -------
        torch.Tensor, shape (b, 1, o) or (b, t, o)
            The reference's shapes: a token axis of 1 for 2-D input.

        Examples
        --------
        >>> import torch
        >>> layer = MuMoE(CPMuMoE, input_dim=4, output_dim=8, expert_dims=[6], ranks=3)
        >>> layer(torch.randn(2, 4)).shape  # a token axis of 1, as the reference
        torch.Size([2, 1, 8])
        """
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if self.second_dim:
            y, _ = block_forward(
                self.MuMoE,
                self.MuMoE2,
                x,
                gate=self._gate,
                activation=self.gelu,
                input_norm=self.input_ln,
            )
            return y
        layer = self.MuMoE
        with thread_backend("pytorch"):
            y, _ = layer_forward(
                layer.network,
                list(layer.factors),
                x,
                gate=self._gate,
                input_norm=self.input_ln,
                contract=torch_forward,
            )
        return y

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .half(), .to(torch.bfloat16): the gate's norm statistics stay in float32.
        super()._apply(fn, recurse)
        keep_statistics_wide(self.bn if self.normalization == "bn" else self.ln)
        return self

    def _gate(self, x: torch.Tensor) -> list[torch.Tensor]:
        # The reference keeps the last coefficients as .a, attached to the graph.  The call
        # uses its own: another thread may replace .a before this one reads it back.
        norms = self.bn if self.normalization == "bn" else self.ln
        # Dense (no max_density): the reference's contraction takes (B, N) coefficients.
        coefficients: list[torch.Tensor] = torch_gate_coefficients(  # type: ignore[assignment]
            x, list(self.projs), list(norms), self.act
        )
        self.a = coefficients
        return coefficients
