r"""The layer recipe, once, on any backend: gates, input norm, contraction; and the block.

Every μMoE layer computes

.. math::
    a^{(e)} = \phi\bigl(\mathrm{norm}(x G_e)\bigr), \qquad
    y = \mathrm{contract}\bigl(\mathcal{W}, a^{(1)} s^{(1)}, \dots, a^{(E)} s^{(E)},
    \mathrm{LN}(x)\bigr)

— gate coefficients from the raw input (:func:`mumoe.gates.gate_coefficients`),
optionally rescaled per expert (:math:`s^{(e)}`, an expert edit: exact because
:math:`\mathcal{W}` is linear in each expert mode), an optional layer norm of
the input, then Eq. 1 contracted from the factors.  A block shares one gate
across an encoder (μMoE or dense, optionally gated as a GLU) and a μMoE
decoder, with a hidden activation between.  :func:`layer_forward`
and :func:`block_forward` are that recipe; the PyTorch modules
(:mod:`mumoe.nn`), the serving layers (:mod:`mumoe.inference`) and the
reference-compatible layers (:mod:`mumoe.nn.compat`) hold parameters and state
and call them.

Index legend: ``b`` batch (any number of leading dimensions), ``i`` input,
``o`` output, ``n_e`` expert mode ``e``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mumoe.functional._forward import contract
from mumoe.plan import Planner
from mumoe.spec import Network
from mumoe.typing import SparseGate, Tensor

__all__ = ["Contract", "block_forward", "layer_forward", "scale_gates"]

#: A gate step: from ``x`` to each level's coefficients, dense or as a support.
Gate = Callable[[Tensor], Sequence[Tensor | SparseGate]]
Transform = Callable[[Tensor], Tensor]
LayerCall = Callable[[Tensor, Sequence[Tensor]], Tensor]


#: The contraction step, ``(network, cores, x, gates, planner) -> y``, as
#: :func:`mumoe.functional.contract` (each gate dense or a :class:`~mumoe.typing.SparseGate`).
Contract = Callable[
    [Network, Sequence[Tensor], Tensor, Sequence[Tensor | SparseGate], Planner | None], Tensor
]


def _contract(
    network: Network,
    cores: Sequence[Tensor],
    x: Tensor,
    gates: Sequence[Tensor],
    planner: Planner | None,
) -> Any:
    return contract(network, cores, x, gates, planner=planner, differentiable=False)


def scale_gates(gates: Sequence[Tensor], scales: Mapping[int, Tensor] | None) -> list[Tensor]:
    r"""The coefficients of an expert edit: ``gates[e] * scales[e]``.

    :math:`\mathcal{W}` is linear in each expert mode, so scaling the
    coefficient :math:`a^{(e)}_n` is scaling the expert slice
    :math:`\mathcal{W}[\dots, n, \dots]`.

    Parameters
    ----------
    gates : sequence of tensors (..., N_e) or SparseGate
        A :class:`~mumoe.typing.SparseGate`'s values are scaled by the
        factors of their experts.
    scales : mapping of level to tensor of shape (N_e,), or None
        Factors per expert of some levels; None or empty: no edit.

    Returns
    -------
    list of tensors, each (..., N_e)

    Examples
    --------
    >>> import numpy as np
    >>> scale_gates([np.full((2, 3), 0.5)], {0: np.array([1.0, 0.0, 2.0])})[0][0]
    array([0.5, 0. , 1. ])
    """
    if not scales:
        return list(gates)
    return [_scaled(a, scales[e]) if e in scales else a for e, a in enumerate(gates)]


def _scaled(gate: Any, scales: Tensor) -> Any:
    if isinstance(gate, SparseGate):  # each entry scaled by its expert's factor
        return SparseGate(gate.indices, gate.values * scales[gate.indices], gate.n_experts)
    return gate * scales


def layer_forward(
    network: Network,
    cores: Sequence[Tensor],
    x: Tensor,
    *,
    gate: Gate | None = None,
    gates: Tensor | Sequence[Tensor] | None = None,
    input_norm: Transform | None = None,
    scales: Mapping[int, Tensor] | None = None,
    planner: Planner | None = None,
    contract: Contract = _contract,
) -> tuple[Tensor, list[Tensor]]:
    r"""One μMoE layer: gates from ``x`` (unless given), edits, input norm, contraction.

    .. math::
        y_{bo} = \sum_{n_1, \dots, n_E, i}
        \mathcal{W}[n_1, \dots, n_E, i, o]\,
        a^{(1)}_{b n_1} s^{(1)}_{n_1} \cdots a^{(E)}_{b n_E} s^{(E)}_{n_E}\, z_{bi}

    with :math:`a = \mathrm{gate}(x)`, :math:`z = \mathrm{input\_norm}(x)`
    (with its bias entry) and :math:`s` the expert scales (1 by default).

    Parameters
    ----------
    network : Network
    cores : sequence of tensors
        Of shapes ``network.core_shapes``, checked by the caller.
    x : tensor, shape (..., I)
    gate : callable, optional
        From ``x`` to the coefficients of every level, each dense or a
        :class:`~mumoe.typing.SparseGate`.
    gates : tensor or SparseGate, or a sequence of them, optional
        Coefficients to use instead of ``gate(x)``, each ``(..., N_e)`` or a
        support; a single one with one expert level.
    input_norm : callable, optional
        Applied to ``x`` before the contraction (not before the gate).
    scales : mapping of level to tensor (N_e,), optional
        See :func:`scale_gates`.
    planner : Planner, optional
        The planner of ``network`` the contraction uses (the layer's own);
        :func:`mumoe.plan.planner_of` ``(network)`` by default.
    contract : callable, default :func:`mumoe.functional.contract`
        The contraction, called as ``contract(network, cores, x, gates,
        planner)``; the torch modules pass theirs (autocast, grad mode).

    Returns
    -------
    y : tensor, shape (..., O)
    gates : list of tensors (..., N_e) or SparseGate
        The coefficients used, before any expert edit, as the gate gave them.

    Raises
    ------
    ValueError
        If neither ``gate`` nor ``gates`` is given.

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, random_cores
    >>> from mumoe.gates import gate_coefficients, softmax
    >>> net = cp(3, 2, expert_dims=4, rank=5)
    >>> gate = lambda x: gate_coefficients(x, [np.zeros((3, 4))], [None], softmax)
    >>> y, gates = layer_forward(net, random_cores(net, random_state=0), np.ones((6, 3)), gate=gate)
    >>> y.shape, gates[0][0]
    ((6, 2), array([0.25, 0.25, 0.25, 0.25]))
    """
    if gates is None:
        if gate is None:
            raise ValueError("this layer has no gate (gated=False): pass gates to the call")
        coefficients = list(gate(x))
    elif type(gates) in (list, tuple):
        coefficients = list(gates)
    else:
        coefficients = [gates]
    z = x if input_norm is None else input_norm(x)
    y = contract(network, cores, z, scale_gates(coefficients, scales), planner)
    return y, coefficients


def block_forward(
    first: LayerCall,
    second: LayerCall,
    x: Tensor,
    *,
    gate: Gate,
    activation: Transform,
    input_norm: Transform | None = None,
    up: LayerCall | None = None,
    output_bias: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """An MLP block driven by one gate: ``second(act(first(z, a)) [* up(z, a)], a) [+ b]``.

    With ``a = gate(x)`` and ``z = norm(x)``: the μMoE replacement of a
    transformer or MLP-Mixer MLP.  The gate is computed once, from the block's
    raw input (the reference's ``second_dim``; MxD's gate reads the MLP's
    input too), and drives every μMoE layer of the block.

    Parameters
    ----------
    first, second : callable
        The encoder and the decoder, each called as ``layer(x, gates)``: a
        μMoE layer without a gate of its own (:class:`mumoe.nn.MuMoE`,
        :class:`mumoe.inference.InferenceMuMoE`, which run
        :func:`layer_forward`), or a dense layer that ignores the gates.
    x : tensor, shape (..., I)
    gate : callable
        From ``x`` to the coefficients of every level (shared by the layers),
        each dense or a :class:`~mumoe.typing.SparseGate`.
    activation : callable
        The hidden activation, on ``first``'s output.
    input_norm : callable, optional
        Applied to ``x`` before the encoder (not before the gate).
    up : callable, optional
        A gated (GLU) block's second encoder, called as ``first`` is: the
        hidden is ``activation(first(z, a)) * up(z, a)`` (SwiGLU with SiLU).
    output_bias : tensor, shape (O,), optional
        Added to the decoder's output: one bias shared by every expert (MxD's).

    Returns
    -------
    y : tensor, shape (..., O)
    gates : list of tensors (..., N_e) or SparseGate

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, random_cores
    >>> from mumoe.gates import gate_coefficients, gelu, softmax
    >>> fc1, fc2 = cp(6, 10, expert_dims=4, rank=2), cp(10, 6, expert_dims=4, rank=2)
    >>> def layer(net, cores):
    ...     return lambda x, gates: layer_forward(net, cores, x, gates=gates)[0]
    >>> gate = lambda x: gate_coefficients(x, [np.zeros((6, 4))], [None], softmax)
    >>> y, _ = block_forward(layer(fc1, random_cores(fc1)), layer(fc2, random_cores(fc2)),
    ...                      np.ones((2, 6)), gate=gate, activation=gelu)
    >>> y.shape
    (2, 6)
    >>> dense = lambda x, gates: x @ np.ones((6, 10))  # a dense encoder: gates unused
    >>> y, _ = block_forward(dense, layer(fc2, random_cores(fc2)), np.ones((2, 6)), gate=gate,
    ...                      activation=gelu, up=dense, output_bias=np.zeros(6))
    >>> y.shape
    (2, 6)
    """
    gates = list(gate(x))
    z = x if input_norm is None else input_norm(x)
    hidden = activation(first(z, gates))
    if up is not None:
        hidden = hidden * up(z, gates)
    y = second(hidden, gates)
    return (y, gates) if output_bias is None else (y + output_bias, gates)
