r"""The gate as a torch module: :class:`MuMoEGate`, and torch kernels for the gate activations.

The gate's recipe and vocabulary are :mod:`mumoe.gates`'s: for each expert
level :math:`e`,

.. math::
    a^{(e)} = \phi\bigl(\mathrm{norm}(x G_e)\bigr), \qquad
    G_e \in \mathbb{R}^{I \times N_e} \text{ zero-initialised},

with ``norm`` one of :data:`mumoe.gates.NORMALIZATIONS` and :math:`\phi`
one of :data:`mumoe.gates.ACTIVATIONS` or any callable.  This module holds
the torch state (projections, batch-norm statistics) and
:data:`TORCH_KERNELS`, the torch implementations of those names:
:mod:`mumoe.nn`'s entmax-1.5 and sparsemax (exact, closed-form
gradients, a selection of each row's largest logits instead of a sort),
``torch.softmax``, and top-k.

Gating runs in float32 at least, whatever the input's dtype and whether
``torch.autocast`` is on: the logits, their normalisation (whose running
statistics are kept in float32) and the activation.  The coefficients are
then cast to the input's dtype.  In float16, logits of a few tens of
thousands overflow entmax-1.5's squares (deep-spin/entmax#30), and
half-precision running variances lose the precision batch norm needs.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mumoe.backends import thread_backend
from mumoe.functional import dense_gates
from mumoe.gates import (
    NORMALIZATIONS,
    SPARSE_ACTIVATIONS,
    activation_name,
    balance_loss,
    check_balance,
    check_normalization,
    check_top_k,
    gate_dtype,
)
from mumoe.gates import gate_coefficients as _gate_coefficients
from mumoe.gates import resolve_activation as _resolve
from mumoe.nn import _entmax
from mumoe.nn._bridge import device_type
from mumoe.nn._distributed import check_process_group, group_sum
from mumoe.typing import SparseGate
from mumoe.validation import check_bool

NO_CONTEXT = contextlib.nullcontext()

__all__ = [
    "NORMALIZATIONS",
    "TORCH_KERNELS",
    "MuMoEGate",
    "builtin_name",
    "dense_coefficients",
    "gate_dtype",
    "keep_statistics_wide",
    "resolve_activation",
    "torch_gate_coefficients",
]

Activation = Callable[[torch.Tensor], torch.Tensor]


def _under_functorch(tensor: torch.Tensor) -> bool:
    # Inside a torch.func transform, tensors are functorch wrappers (private API: absent
    # from some builds, then nothing is detected and torch's own error stands).
    # Not under torch.compile: Dynamo cannot trace the check (a graph break per call).
    if torch.compiler.is_compiling():
        return False
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(tensor))


def _not_under_functorch(activation: Activation) -> Activation:
    """``activation``, with a clear error inside torch.func transforms (it calls NumPy)."""

    # wraps: the module-level name and qualified name of ``activation``, so that
    # pickle finds the wrapper where it lives (whole-model pickling, issue #15, item 12).
    @functools.wraps(activation)
    def checked(logits: torch.Tensor) -> torch.Tensor:
        if _under_functorch(logits):
            raise RuntimeError(
                f"torch.func transforms (grad, vmap, jacrev, ...) cannot run the gate's "
                f"{activation.__name__.lstrip('_')}: its threshold is found with NumPy "
                "(mumoe.nn); use activation='softmax' or 'topk' under torch.func, "
                "or torch.autograd"
            )
        return activation(logits)

    return checked


@_not_under_functorch
def _entmax15(logits: torch.Tensor) -> torch.Tensor:
    return _entmax.entmax15(logits)


@_not_under_functorch
def _sparsemax(logits: torch.Tensor) -> torch.Tensor:
    return _entmax.sparsemax(logits)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def _topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    # mumoe.gates.topk's rule: the k largest logits and any tied with the k-th.
    # One torch.topk of k + 1 (no sort of the row) gives the kept values and
    # shows the rows where a tie crosses the boundary; only those take the
    # elementwise threshold, which touches every entry.
    n = logits.shape[-1]
    if k >= n:
        return torch.softmax(logits, dim=-1)
    values, index = torch.topk(logits, k + 1, dim=-1)
    out = torch.zeros_like(logits).scatter(-1, index[..., :k], torch.softmax(values[..., :k], -1))
    # A row holding NaN or +inf is NaN throughout, as softmax's (topk ranks NaN first):
    # its largest value minus itself is NaN there and 0 elsewhere.
    top = values[..., :1].detach()
    out = out + (top - top)
    tied = values[..., k - 1] == values[..., k]
    # Under vmap or torch.compile a data-dependent branch is not allowed (or breaks the
    # graph): every row takes the tie path.
    if _under_functorch(logits) or torch.compiler.is_compiling() or bool(tied.any()):
        kept = logits >= values[..., k - 1 : k].detach()
        e = torch.exp(logits - values[..., :1].detach()).masked_fill(~kept, 0.0)
        out = torch.where(tied.unsqueeze(-1), e / e.sum(-1, keepdim=True), out)
    return out


def _relu_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    # mumoe.gates.relu_topk's rule: the rectified logits at or above the row's k-th
    # largest, unnormalised; the selection carries no gradient.
    rectified = torch.relu(logits)  # NaN stays NaN
    # A row holding NaN or +inf is NaN throughout, as on every backend.
    top = rectified.detach().amax(-1, keepdim=True)
    if k < logits.shape[-1]:
        kth = torch.topk(rectified.detach(), k, dim=-1).values[..., k - 1 :]
        rectified = rectified.masked_fill(rectified < kth, 0.0)
    return rectified + (top - top)


#: The torch kernels of the names of :data:`mumoe.gates.ACTIVATIONS` (the same keys).
TORCH_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "entmax15": _entmax15,
    "sparsemax": _sparsemax,
    "softmax": _softmax,
    "topk": _topk,
    "relu_topk": _relu_topk,
}


def builtin_name(activation: Callable[..., torch.Tensor]) -> str | None:
    """The vocabulary name of ``activation`` if it is a built-in kernel itself, else None.

    By identity, not by ``__name__``: a user's own function called ``softmax``
    is not the built-in (a weights file must not describe it as one).

    Parameters
    ----------
    activation : callable
        A gate's resolved activation (``MuMoEGate.activation``).

    Returns
    -------
    str or None

    Examples
    --------
    >>> builtin_name(resolve_activation("softmax")), builtin_name(lambda z: z.softmax(-1))
    ('softmax', None)
    """
    for name, kernel in TORCH_KERNELS.items():
        if activation is kernel:
            return name
        if isinstance(activation, functools.partial) and activation.func is kernel:
            return name if set(activation.keywords) == {"k"} and not activation.args else None
    return None


def resolve_activation(activation: str | Activation, *, top_k: int | None = None) -> Activation:
    """The torch kernel of the activation called ``activation``, or ``activation`` if callable.

    Parameters
    ----------
    activation : {"entmax15", "sparsemax", "softmax", "topk", "relu_topk"} or callable
    top_k : int, optional
        With ``"topk"`` or ``"relu_topk"`` (and only then): the experts each row keeps.

    Returns
    -------
    callable
        From logits ``(B, N)`` to coefficients ``(B, N)``.

    Raises
    ------
    ValueError
        For a name outside :data:`mumoe.gates.ACTIVATIONS`, or ``top_k``
        missing for a top-k activation or given for anything else.

    Examples
    --------
    >>> import torch
    >>> resolve_activation("sparsemax")(torch.tensor([[3.0, 1.0, 0.0]]))
    tensor([[1., 0., 0.]])
    """
    return _resolve(activation, TORCH_KERNELS, top_k=top_k)


def torch_gate_coefficients(
    x: torch.Tensor,
    projections: Sequence[torch.Tensor],
    norms: Sequence[nn.Module | None],
    activation: Activation,
    logits: list[torch.Tensor] | None = None,
    biases: Sequence[torch.Tensor] | None = None,
    *,
    max_density: float | None = None,
    support: Callable[..., torch.Tensor | SparseGate] | None = None,
) -> list[torch.Tensor | SparseGate]:
    """:func:`mumoe.gates.gate_coefficients` with ``torch.autocast`` off (float32 at least).

    Parameters
    ----------
    x : torch.Tensor, shape (..., I)
    projections : sequence of torch.Tensor, each (I, N_e)
    norms : sequence of modules or None
        ``nn.Identity`` counts as none.
    activation : callable
    logits : list, optional
        Receives each level's activation input, ``(..., N_e)``.
    biases : sequence of torch.Tensor, each (N_e,), optional
    max_density, support : optional
        A level as its support where it fits (see
        :func:`mumoe.gates.gate_coefficients`).

    Returns
    -------
    list of torch.Tensor, each (..., N_e), or SparseGate

    Examples
    --------
    >>> import torch
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     gates = torch_gate_coefficients(torch.randn(2, 8), [torch.zeros(8, 4)], [None],
    ...                                     resolve_activation("softmax"))
    >>> gates[0].dtype
    torch.float32
    """
    kept = [None if isinstance(n, nn.Identity) else n for n in norms]
    device = device_type(x)
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else NO_CONTEXT:
        return _gate_coefficients(
            x,
            projections,
            kept,
            activation,
            logits,
            biases,
            max_density=max_density,
            support=support,
        )


def dense_coefficients(gates: Sequence[torch.Tensor | SparseGate]) -> list[torch.Tensor]:
    """A gate's output as dense tensors (:func:`mumoe.functional.densify` where sparse).

    What hooks on a :class:`MuMoEGate` read: its levels come as supports
    (:class:`~mumoe.typing.SparseGate`) when a layer asks for them.

    Parameters
    ----------
    gates : sequence of torch.Tensor or SparseGate

    Returns
    -------
    list of torch.Tensor, each (..., N_e)

    Examples
    --------
    >>> import torch
    >>> sparse = SparseGate(torch.tensor([[1]]), torch.tensor([[1.0]]), 3)
    >>> dense_coefficients([sparse])
    [tensor([[0., 1., 0.]])]
    """
    if all(isinstance(g, torch.Tensor) for g in gates):
        return list(gates)  # type: ignore[arg-type]
    with thread_backend("pytorch"):
        return dense_gates(gates)


def keep_statistics_wide(norms: Iterable[nn.Module]) -> None:
    """Put the floating buffers of gate norms back in float32 at least, after a cast.

    Gating computes in float32 (:func:`mumoe.gates.gate_dtype`); batch-norm
    running statistics cast to 16 bits by ``.half()`` or ``.to(torch.bfloat16)``
    would lose precision and fail in ``batch_norm`` against float32 logits.

    Parameters
    ----------
    norms : iterable of torch.nn.Module

    Examples
    --------
    >>> bn = torch.nn.BatchNorm1d(3, affine=False).half()
    >>> keep_statistics_wide([bn])
    >>> bn.running_var.dtype
    torch.float32
    """
    for norm in norms:
        for name, buffer in list(norm.named_buffers(recurse=False)):
            wanted = gate_dtype(buffer.dtype)
            if buffer.is_floating_point() and buffer.dtype != wanted:
                setattr(norm, name, buffer.to(wanted))


def _norm(kind: str | None, n: int, device: object, dtype: torch.dtype | None) -> nn.Module:
    dtype = gate_dtype(dtype or torch.get_default_dtype())
    if kind == "bn":
        return nn.BatchNorm1d(n, affine=False, device=device, dtype=dtype)
    if kind == "ln":
        return nn.LayerNorm(n, elementwise_affine=False, bias=False, device=device, dtype=dtype)
    return nn.Identity()


class MuMoEGate(nn.Module):
    r"""The gates of a μMoE layer: one coefficient vector per expert level.

    Parameters
    ----------
    in_features : int
        :math:`I`, the size of the input the gates are computed from.
    expert_dims : sequence of int
        :math:`N_1, \dots, N_E`.
    normalization : {"bn", "ln", None}, default "bn"
        Of the logits: batch norm or layer norm without affine parameters.
    activation : str or callable, default "entmax15"
        One of :data:`mumoe.gates.ACTIVATIONS` (``"entmax15"``, ``"sparsemax"``,
        ``"softmax"``, ``"topk"``, ``"relu_topk"``), or a callable.
    top_k : int, optional
        With ``activation="topk"`` or ``"relu_topk"``: the experts each row
        keeps (:func:`mumoe.gates.topk`, :func:`mumoe.gates.relu_topk`).
    bias : bool, default False
        A bias on each level's logits, :math:`x G_e + b_e`, zero-initialised
        (MxD's gate); refused with batch norm, which would cancel it.
    balance : mapping of str to float, optional
        Balance losses and their coefficients, e.g. ``{"importance_cv2":
        0.01, "z_loss": 1e-3}`` (:data:`mumoe.gates.LOSSES`).  Each forward
        pass then sets :attr:`aux_loss` to their weighted sum over the levels
        (differentiable; None without ``balance``); sum them over a model
        with :func:`mumoe.nn.collect_aux_losses`.  Padding is left out inside
        :func:`mumoe.nn.gate_mask`; the losses are the whole batch's over a
        process group after :func:`mumoe.nn.reduce_balance_over`
        (:attr:`balance_group`).
    device, dtype
        Of the parameters, as for ``torch.nn.Linear``.

    Notes
    -----
    Maps an input ``(..., I)`` to ``[(..., N_1), ..., (..., N_E)]`` with
    :func:`mumoe.gates.gate_coefficients`, autocast off.  :attr:`aux_loss`
    is replaced on every forward pass: a gate called twice in one step keeps
    the second call's.

    Examples
    --------
    >>> import torch
    >>> gate = MuMoEGate(8, (4, 3))
    >>> [tuple(a.shape) for a in gate(torch.randn(5, 2, 8))]
    [(5, 2, 4), (5, 2, 3)]
    """

    def __init__(
        self,
        in_features: int,
        expert_dims: Sequence[int],
        *,
        normalization: str | None = "bn",
        activation: str | Activation = "entmax15",
        top_k: int | None = None,
        bias: bool = False,
        balance: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if check_bool(bias, "bias") and normalization == "bn":
            raise ValueError(
                "a gate bias is cancelled by batch normalization (it subtracts each expert's "
                "mean logit); use normalization=None or 'ln' with a gate bias"
            )
        self.balance = check_balance(balance)
        #: The balance losses of the last forward pass (None without ``balance``).
        self.aux_loss: torch.Tensor | None = None
        #: The padding mask in force (set by mumoe.nn.gate_mask only).
        self.mask: torch.Tensor | None = None
        self.in_features = in_features
        self.expert_dims = tuple(expert_dims)
        self.normalization = check_normalization(normalization)
        self.activation = resolve_activation(activation, top_k=top_k)
        self.top_k = check_top_k(activation, top_k)  # a plain int: np.int64(2) saves as 2
        small = [(e, n) for e, n in enumerate(expert_dims) if self.top_k and self.top_k > n]
        if small:
            level, n = small[0]
            raise ValueError(
                f"top_k={self.top_k} is more experts than level {level} has ({n}); a token "
                f"keeps at most the {n} there are: give top_k <= {n}"
            )
        self.activation_name = activation_name(activation)
        # The activation computed as a support directly (top-k), or None: sparsified.
        support = SPARSE_ACTIVATIONS.get(self.activation_name)
        self.support = None if support is None else functools.partial(support, k=self.top_k)
        self.projections = nn.ParameterList(
            [
                nn.Parameter(torch.empty(in_features, n, device=device, dtype=dtype))
                for n in self.expert_dims
            ]
        )
        self.norms = nn.ModuleList(
            [_norm(normalization, n, device, dtype) for n in self.expert_dims]
        )
        self.biases = (
            nn.ParameterList(
                [nn.Parameter(torch.empty(n, device=device, dtype=dtype)) for n in self.expert_dims]
            )
            if bias
            else None
        )
        self.reset_parameters()

    @property
    def balance_group(self) -> dist.ProcessGroup | None:
        """The process group whose batches the balance losses sum over in training.

        None (default): this process's batch alone.  Set it with
        :func:`mumoe.nn.reduce_balance_over`, or assign a
        ``torch.distributed.ProcessGroup``, ``True`` (the default group) or
        None.  Copies and pickles of the gate do not keep it.

        Examples
        --------
        >>> MuMoEGate(4, (3,)).balance_group is None
        True
        """
        # .get: a gate pickled before this attribute existed has none.
        return self.__dict__.get("_balance_group")

    @balance_group.setter
    def balance_group(self, group: dist.ProcessGroup | bool | None) -> None:
        self.__dict__["_balance_group"] = check_process_group(group, "balance_group")

    def __getstate__(self) -> dict[str, object]:
        # A process group belongs to this process: it neither pickles nor deep-copies.
        # The last pass's aux_loss is a node of that pass's graph, not state (a
        # non-leaf tensor cannot be deep-copied).
        state = super().__getstate__()
        state.pop("_balance_group", None)
        state["aux_loss"] = None
        return state

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .half(), .to(torch.bfloat16), ...: the projections follow, the norms'
        # running statistics stay in float32 (see the module docstring).
        super()._apply(fn, recurse)
        keep_statistics_wide(self.norms)
        return self

    def reset_parameters(self) -> None:
        r"""Zero the projections (every expert starts equally weighted) and reset norms.

        Under ``"relu_topk"`` zero logits would leave every expert off, with no
        gradient to turn one on: its projections start as ``nn.Linear``'s
        weights do, uniform in :math:`\pm 1/\sqrt{I}` (MxD's reference).

        Examples
        --------
        >>> import torch
        >>> gate = MuMoEGate(4, (3,))
        >>> gate.reset_parameters()
        >>> gate(torch.randn(5, 4))[0][0]  # equal logits: equal coefficients
        tensor([0.3333, 0.3333, 0.3333], grad_fn=<SelectBackward0>)
        """
        for projection in self.projections:
            if self.activation_name == "relu_topk":
                bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0
                nn.init.uniform_(projection, -bound, bound)
            else:
                nn.init.zeros_(projection)
        for bias in self.biases or ():
            nn.init.zeros_(bias)
        for norm in self.norms:
            if isinstance(norm, nn.BatchNorm1d):
                norm.reset_running_stats()

    def forward(
        self, x: torch.Tensor, max_density: float | None = None
    ) -> list[torch.Tensor | SparseGate]:
        """The gate coefficients of every level.

        Parameters
        ----------
        x : torch.Tensor, shape (..., I)
        max_density : float, optional
            Give each level whose support is at most this share of its
            experts as a :class:`~mumoe.typing.SparseGate` (top-k gates
            select it directly; entmax-1.5, sparsemax and custom activations
            are sparsified); the layers pass their planner's crossover
            (:meth:`mumoe.plan.Planner.max_density`).  None (default), a
            softmax gate, and calls under ``torch.compile`` or ``torch.func``
            (whose graphs cannot hold a data-dependent ``k``) give dense
            coefficients.

        Returns
        -------
        list of torch.Tensor, each (..., N_e), or SparseGate
            The same coefficients either way (:func:`mumoe.functional.densify`).

        Examples
        --------
        >>> import torch
        >>> [tuple(a.shape) for a in MuMoEGate(4, (3, 2))(torch.randn(5, 4))]
        [(5, 3), (5, 2)]
        >>> gate = MuMoEGate(4, (64,), normalization=None, activation="topk", top_k=2)
        >>> _ = torch.nn.init.normal_(gate.projections[0])  # zero logits tie: every expert kept
        >>> gate(torch.randn(5, 4), max_density=0.25)[0]
        SparseGate(shape=(5, 2), n_experts=64)
        """
        projections = list(self.projections._parameters.values())
        if self.training and self.normalization == "bn" and x.numel() == x.shape[-1]:
            raise ValueError(
                "batch-norm gating cannot train on a batch of one row (one token): the "
                "statistics of one row are undefined; train on larger batches, use "
                "normalization='ln' or None, or call .eval() to use the running statistics"
            )
        norms: list[nn.Module | None] = list(self.norms)
        biases = None if self.biases is None else list(self.biases._parameters.values())
        if max_density is not None and (
            max_density <= 0
            or self.activation_name == "softmax"
            or torch.compiler.is_compiling()
            or _under_functorch(x)
        ):
            max_density = None
        if max_density is None and not self.balance:  # dense: no TensorLy call, no switch
            return torch_gate_coefficients(x, projections, norms, self.activation, None, biases)  # type: ignore[arg-type]
        logits: list[torch.Tensor] | None = [] if self.balance else None
        with thread_backend("pytorch"):
            gates = torch_gate_coefficients(
                x,
                projections,  # type: ignore[arg-type]
                norms,
                self.activation,
                logits,
                biases,  # type: ignore[arg-type]
                max_density=max_density,
                support=self.support,
            )
            if self.balance:
                # Over the group in training only: an eval pass on one process never waits.
                group = self.balance_group if self.training else None
                reduce = None if group is None else group_sum(group, differentiable=True)
                self.aux_loss = balance_loss(
                    self.balance, dense_gates(gates), logits or [], self.mask, reduce=reduce
                )
        return gates

    def extra_repr(self) -> str:
        """Sizes and options, for ``repr``."""
        return (
            f"in_features={self.in_features}, expert_dims={self.expert_dims}, "
            f"normalization={self.normalization!r}, activation={self.activation_name!r}"
            + ("" if self.top_k is None else f", top_k={self.top_k}")
            + (", bias=True" if self.biases is not None else "")
            + (f", balance={self.balance}" if self.balance else "")
        )
