r"""Serving μMoE layers in eval mode on any TensorLy backend, no PyTorch needed.

:class:`InferenceMuMoE` and :class:`InferenceMuMoEBlock` (with
:class:`InferenceLinear` for a block's dense encoder) hold arrays of the
active backend (NumPy, CuPy, JAX, PyTorch) and run the layer recipe of
:mod:`mumoe.functional` with the TensorLy gate kernels of :mod:`mumoe.gates`:
batch norm from running statistics, layer norm or none, then the named
activation.  They compute what :class:`mumoe.nn.MuMoE` and
:class:`mumoe.nn.MuMoEBlock` compute in ``eval()`` mode; weights come from
:func:`mumoe.inference.load` (files written by :func:`mumoe.nn.save`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import tensorly as tl

from mumoe.functional import block_forward, check_cores, layer_forward
from mumoe.gates import (
    ACTIVATIONS,
    HIDDEN_ACTIVATIONS,
    SPARSE_ACTIVATIONS,
    batch_norm,
    check_hidden_activation,
    check_normalization,
    gate_coefficients,
    layer_norm,
    resolve_activation,
)
from mumoe.plan import Planner, resolve_planner
from mumoe.spec import Network
from mumoe.typing import SparseGate, Tensor
from mumoe.validation import check_tensor

__all__ = ["InferenceLinear", "InferenceMuMoE", "InferenceMuMoEBlock"]

Affine = tuple[Tensor, Tensor]


def _input_norm(affine: Affine | None, eps: float) -> Callable[[Tensor], Tensor] | None:
    if affine is None:
        return None
    weight, bias = affine
    return lambda x: layer_norm(x, weight, bias, eps=eps)


class InferenceMuMoE:
    r"""A μMoE layer in eval mode on the active TensorLy backend.

    Computes the same function as :class:`mumoe.nn.MuMoE` in ``eval()``
    mode: gates from the input (batch norm from running statistics, layer
    norm, or none; then the named activation), the optional input layer norm,
    and Eq. 1 contracted along the network's plan
    (:func:`mumoe.functional.layer_forward`).

    Parameters
    ----------
    network : Network
    cores : sequence of tensors
        Of shapes ``network.core_shapes``, on the active backend (checked here).
    projections : sequence of tensors, each (I, N_e), optional
        The gate projections; without them, calls need ``gates``.
    biases : sequence of tensors, each (N_e,), optional
        The gate biases, added to the logits (with ``projections``).
    normalization : {"bn", "ln", None}
    running_mean, running_var : sequences of tensors, each (N_e,)
        With ``"bn"``.
    activation : {"entmax15", "sparsemax", "softmax", "topk", "relu_topk"}
    top_k : int, optional
        With ``activation="topk"`` or ``"relu_topk"``: the experts each row keeps.
    input_norm_affine : tuple of (weight, bias), optional
        The input layer norm's affine parameters, each (I,); no input norm
        without.
    eps : float
        Of the gate's normalisation.
    input_eps : float
        Of the input layer norm.
    planner : Planner, optional
        A planner of ``network`` (path policy and plan cache);
        :func:`mumoe.plan.planner_of` by default.

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, random_cores
    >>> net = cp(6, 4, expert_dims=8, rank=3)
    >>> layer = InferenceMuMoE(net, random_cores(net, random_state=0),
    ...                        projections=[np.zeros((6, 8))], normalization=None)
    >>> layer(np.ones((5, 6))).shape
    (5, 4)
    """

    def __init__(
        self,
        network: Network,
        cores: Sequence[Tensor],
        *,
        projections: Sequence[Tensor] | None = None,
        biases: Sequence[Tensor] | None = None,
        normalization: str | None = "bn",
        running_mean: Sequence[Tensor] | None = None,
        running_var: Sequence[Tensor] | None = None,
        activation: str = "entmax15",
        top_k: int | None = None,
        input_norm_affine: Affine | None = None,
        eps: float = 1e-5,
        input_eps: float = 1e-5,
        planner: Planner | None = None,
    ) -> None:
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown gate activation {activation!r}; choose one of "
                f"{', '.join(map(repr, ACTIVATIONS))}"
            )
        self._activation = resolve_activation(activation, top_k=top_k)
        support = SPARSE_ACTIVATIONS.get(activation)
        self._support = None if support is None else functools.partial(support, k=top_k)
        check_normalization(normalization)
        if (
            normalization == "bn"
            and projections is not None
            and (running_mean is None or running_var is None)
        ):
            raise ValueError("batch-norm gating needs running_mean and running_var")
        self.backend = tl.get_backend()  # the backend of its arrays, checked at each call
        check_cores(network, cores, self.backend)
        self.network = network
        self.planner = resolve_planner(network, planner)
        self.cores = list(cores)
        self.projections = None if projections is None else list(projections)
        if biases is not None and (projections is None or len(biases) != len(projections)):
            raise ValueError(
                f"biases must come with the gate's projections, one per level: got "
                f"{len(biases)} biases and {0 if projections is None else len(projections)} "
                "projections"
            )
        self.biases = None if biases is None else list(biases)
        self.normalization = normalization
        self.running_mean = None if running_mean is None else list(running_mean)
        self.running_var = None if running_var is None else list(running_var)
        self.activation = activation
        self.top_k = top_k
        self.input_norm_affine = input_norm_affine
        self.eps = eps
        self.input_eps = input_eps

    def _norms(self) -> list[Callable[[Tensor], Tensor] | None]:
        levels = len(self.projections or ())
        if self.normalization == "bn" and self.running_mean and self.running_var:
            return [
                functools.partial(batch_norm, mean=m, var=v, eps=self.eps)
                for m, v in zip(self.running_mean, self.running_var, strict=True)
            ]
        if self.normalization == "ln":
            return [lambda z: layer_norm(z, eps=self.eps)] * levels
        return [None] * levels

    def gates(self, x: Tensor, max_density: float | None = None) -> list[Tensor | SparseGate]:
        """The gate coefficients of every level.

        Parameters
        ----------
        x : tensor, shape (..., I)
        max_density : float, optional
            Give each level whose support is at most this share of its
            experts as a :class:`~mumoe.typing.SparseGate`, as the layer's
            own call does with its planner's crossover
            (:meth:`mumoe.plan.Planner.max_density`); None: dense.

        Returns
        -------
        list of tensors (..., N_e), or SparseGate

        Raises
        ------
        ValueError
            If the layer has no gate.

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp, random_cores
        >>> net = cp(4, 5, expert_dims=(3, 2), rank=2)
        >>> projections = [np.zeros((4, 3)), np.zeros((4, 2))]
        >>> layer = InferenceMuMoE(net, random_cores(net), projections=projections,
        ...                        normalization=None, activation="softmax")
        >>> layer.gates(np.ones((1, 4)))
        [array([[0.33333333, 0.33333333, 0.33333333]]), array([[0.5, 0.5]])]
        """
        if self.projections is None:
            raise ValueError("this layer has no gate: pass gates to the call")
        self._check_backend()
        if self.activation == "softmax" or not max_density:
            max_density = None  # a softmax support is the whole level; 0: dense
        return gate_coefficients(
            x,
            self.projections,
            self._norms(),
            self._activation,
            biases=self.biases,
            max_density=max_density,
            support=self._support,
        )

    def _sparse_gates(self, x: Tensor) -> list[Tensor | SparseGate]:
        # The gate step of a call: levels of small support as supports.
        rows = math.prod(tl.shape(x)[:-1])
        sparsified = self._support is None
        return self.gates(x, self.planner.max_density(self.backend, False, rows, sparsified))

    def _check(self, x: Tensor) -> None:
        self._check_input(x, self.network.in_features)

    def _check_input(self, x: Tensor, n_in: int) -> None:
        # As mumoe.forward checks its input: the backend's tensor, the layer's dtype (nothing
        # promoted: NumPy and JAX would compute a float32 layer in float64 silently).
        self._check_backend()
        shape = check_tensor(x, "x", self.backend, self.cores[0].dtype, like="the layer")
        if not shape or shape[-1] != n_in:
            raise ValueError(f"input must be a tensor with shape (..., {n_in}), got {shape}")

    def _check_backend(self) -> None:
        active = tl.get_backend()
        if active != self.backend:
            raise ValueError(
                f"this layer's arrays are on the {self.backend!r} backend, where it was built "
                f"or loaded, but the active TensorLy backend is {active!r}: call it under "
                f"tl.set_backend({self.backend!r}) (or mumoe.backends.thread_backend), or load "
                "it again on the active backend"
            )

    def _gate(self) -> Callable[[Tensor], list[Tensor | SparseGate]] | None:
        return None if self.projections is None else self._sparse_gates

    def __call__(self, x: Tensor, gates: Sequence[Tensor] | None = None) -> Tensor:
        """The layer's output for ``x`` of shape ``(..., I)``: shape ``(..., O)``.

        Parameters
        ----------
        x : tensor, shape (..., I)
        gates : sequence of tensors, each (..., N_e), optional
            Coefficients to use instead of the layer's gate.

        Returns
        -------
        tensor, shape (..., O)

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp, random_cores
        >>> net = cp(3, 2, expert_dims=4, rank=2)
        >>> InferenceMuMoE(net, random_cores(net))(np.ones((5, 3)), [np.ones((5, 4))]).shape
        (5, 2)
        """
        self._check(x)
        y, _ = layer_forward(
            self.network,
            self.cores,
            x,
            gate=self._gate(),
            gates=gates,
            input_norm=_input_norm(self.input_norm_affine, self.input_eps),
            planner=self.planner,
        )
        return y

    def __repr__(self) -> str:
        return (
            f"InferenceMuMoE({self.network!r}, normalization={self.normalization!r}, "
            f"activation={self.activation!r}"
            + ("" if self.top_k is None else f", top_k={self.top_k}")
            + f", backend={self.backend!r})"
        )


class InferenceLinear:
    """A dense layer on the active TensorLy backend, as ``torch.nn.Linear``: ``x W^T + b``.

    A block's dense encoder (MxD's).

    Parameters
    ----------
    weight : tensor, shape (O, I)
        ``nn.Linear``'s layout.
    bias : tensor, shape (O,), optional

    Raises
    ------
    ValueError
        If the shapes do not fit each other.

    Examples
    --------
    >>> import numpy as np
    >>> InferenceLinear(np.ones((3, 2)), np.arange(3.0))(np.ones((4, 2))).shape
    (4, 3)
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        shape = tuple(tl.shape(weight))
        if len(shape) != 2:
            raise ValueError(f"weight must have shape (out_features, in_features), got {shape}")
        if bias is not None and tuple(tl.shape(bias)) != shape[:1]:
            raise ValueError(f"bias must have shape {shape[:1]}, got {tuple(tl.shape(bias))}")
        self.out_features, self.in_features = shape
        self.weight = weight
        self.bias = bias
        self._transposed = tl.transpose(weight)  # once: each call multiplies by W^T

    def __call__(self, x: Tensor, gates: Sequence[Tensor] | None = None) -> Tensor:
        """``x @ weight.T + bias`` for ``x`` of shape ``(..., I)``; ``gates`` are ignored.

        Parameters
        ----------
        x : tensor, shape (..., I)
        gates : ignored
            Accepted so that a dense layer is called as a block's μMoE layers are.

        Returns
        -------
        tensor, shape (..., O)

        Examples
        --------
        >>> import numpy as np
        >>> InferenceLinear(np.eye(2))(np.array([[1.0, 2.0]]))
        array([[1., 2.]])
        """
        y = x @ self._transposed
        return y if self.bias is None else y + self.bias

    def __repr__(self) -> str:
        return (
            f"InferenceLinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None})"
        )


class InferenceMuMoEBlock:
    r"""An MLP block with a μMoE decoder in eval mode on the active TensorLy backend.

    ``fc2(act(fc1(z, a)) [* up(z, a)], a) [+ b]`` with ``z = norm(x)`` and
    ``a`` the gates of ``x``, as :class:`mumoe.nn.MuMoEBlock`
    (:func:`mumoe.functional.block_forward`); the hidden activations are
    exact (:data:`mumoe.gates.HIDDEN_ACTIVATIONS`).

    Parameters
    ----------
    fc1 : InferenceMuMoE or InferenceLinear
        The encoder.  A μMoE encoder holds the block's gate.
    fc2 : InferenceMuMoE
        The decoder; after a dense encoder it holds the block's gate, whose
        projections read the block's input.
    up : InferenceMuMoE or InferenceLinear, optional
        A gated (GLU) block's second encoder, of ``fc1``'s kind.
    hidden_activation : str, default "gelu"
        One of :data:`mumoe.gates.HIDDEN_ACTIVATIONS`.
    output_bias : tensor, shape (O,), optional
        One bias for every expert, added after the decoder (MxD's).
    input_norm_affine : tuple of (weight, bias), optional
        The block's input layer norm.
    input_eps : float

    Raises
    ------
    ValueError
        If the layers' sizes do not chain, no layer holds a gate, or the
        hidden activation is unknown.

    Examples
    --------
    >>> import numpy as np
    >>> from mumoe import cp, random_cores
    >>> first, second = cp(6, 10, expert_dims=4, rank=2), cp(10, 6, expert_dims=4, rank=2)
    >>> fc1 = InferenceMuMoE(first, random_cores(first), projections=[np.zeros((6, 4))],
    ...                      normalization=None)
    >>> fc2 = InferenceMuMoE(second, random_cores(second))
    >>> InferenceMuMoEBlock(fc1, fc2)(np.ones((2, 6))).shape
    (2, 6)
    """

    def __init__(
        self,
        fc1: InferenceMuMoE | InferenceLinear,
        fc2: InferenceMuMoE,
        *,
        up: InferenceMuMoE | InferenceLinear | None = None,
        hidden_activation: str = "gelu",
        output_bias: Tensor | None = None,
        input_norm_affine: Affine | None = None,
        input_eps: float = 1e-5,
    ) -> None:
        encoders = [fc1] if up is None else [fc1, up]
        if up is not None and type(up) is not type(fc1):
            raise ValueError(
                f"up must be of fc1's kind, {type(fc1).__name__}; got {type(up).__name__}"
            )
        hidden = fc2.network.in_features
        for name, encoder in zip(("fc1", "up"), encoders, strict=False):
            out = _features(encoder)[1]
            if out != hidden:
                raise ValueError(f"{name} gives {out} features but fc2 takes {hidden}")
        if up is not None and _features(up)[0] != _features(fc1)[0]:
            raise ValueError("up must read fc1's input")
        gate_holder = fc1 if isinstance(fc1, InferenceMuMoE) else fc2
        if gate_holder.projections is None:
            which = "fc1" if gate_holder is fc1 else "fc2 (after a dense encoder)"
            raise ValueError(f"{which} holds the block's gate: give it projections")
        self.fc1, self.fc2, self.up = fc1, fc2, up
        self.hidden_activation = check_hidden_activation(hidden_activation)
        self._activation = HIDDEN_ACTIVATIONS[hidden_activation]
        self.output_bias = output_bias
        self._gate = gate_holder
        self.input_norm_affine = input_norm_affine
        self.input_eps = input_eps

    @property
    def in_features(self) -> int:
        """The block's input size.

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import mxd, random_cores
        >>> decoder = mxd(6, 3, expert_dims=4, bias=False)
        >>> fc2 = InferenceMuMoE(decoder, random_cores(decoder), projections=[np.zeros((5, 4))],
        ...                      normalization=None)
        >>> InferenceMuMoEBlock(InferenceLinear(np.ones((6, 5))), fc2).in_features
        5
        """
        return _features(self.fc1)[0]

    def gates(self, x: Tensor) -> list[Tensor]:
        """The block's gate coefficients for ``x`` of shape ``(..., I)``.

        Parameters
        ----------
        x : tensor, shape (..., I)

        Returns
        -------
        list of tensors, each (..., N_e)

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp, random_cores
        >>> first, second = cp(3, 5, expert_dims=2, rank=2), cp(5, 3, expert_dims=2, rank=2)
        >>> fc1 = InferenceMuMoE(first, random_cores(first), projections=[np.zeros((3, 2))],
        ...                      normalization=None, activation="softmax")
        >>> InferenceMuMoEBlock(fc1, InferenceMuMoE(second, random_cores(second))).gates(
        ...     np.ones((1, 3)))
        [array([[0.5, 0.5]])]
        """
        return self._gate.gates(x)

    def _gates(self, x: Tensor) -> list[Tensor | SparseGate]:
        # The gate step of a call: levels of small support as supports, by the decoder's
        # planner (it contracts them; a dense encoder ignores the gates).
        fc2 = self.fc2
        rows = math.prod(tl.shape(x)[:-1])
        sparsified = self._gate._support is None
        density = fc2.planner.max_density(fc2.backend, False, rows, sparsified)
        return self._gate.gates(x, density)

    def __call__(self, x: Tensor) -> Tensor:
        """The block's output for ``x`` of shape ``(..., I)``: shape ``(..., O)``.

        Parameters
        ----------
        x : tensor, shape (..., I)

        Returns
        -------
        tensor, shape (..., O)

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp, random_cores
        >>> first, second = cp(3, 5, expert_dims=2, rank=2), cp(5, 3, expert_dims=2, rank=2)
        >>> fc1 = InferenceMuMoE(first, random_cores(first), projections=[np.zeros((3, 2))],
        ...                      normalization=None)
        >>> InferenceMuMoEBlock(fc1, InferenceMuMoE(second, random_cores(second)))(np.ones(3)).shape
        (3,)
        """
        self._gate._check_input(x, self.in_features)
        y, _ = block_forward(
            self.fc1,
            self.fc2,
            x,
            gate=self._gates,
            activation=self._activation,
            input_norm=_input_norm(self.input_norm_affine, self.input_eps),
            up=self.up,
            output_bias=self.output_bias,
        )
        return y

    def __repr__(self) -> str:
        up = "" if self.up is None else f", up={self.up!r}"
        return (
            f"InferenceMuMoEBlock(fc1={self.fc1!r}{up}, fc2={self.fc2!r}, "
            f"hidden_activation={self.hidden_activation!r}, "
            f"output_bias={self.output_bias is not None})"
        )


def _features(layer: InferenceMuMoE | InferenceLinear) -> tuple[int, int]:
    if isinstance(layer, InferenceLinear):
        return layer.in_features, layer.out_features
    return layer.network.in_features, layer.network.out_features
