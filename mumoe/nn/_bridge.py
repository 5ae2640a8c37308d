"""The contraction step from torch: autocast, grad mode and TensorLy's ``pytorch`` backend.

The one path every torch module takes into the functional core
(:func:`mumoe.functional.forward` / :func:`~mumoe.functional.contract`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tensorly.backend import BackendManager

from mumoe import functional
from mumoe.backends import thread_backend
from mumoe.plan import Planner, batch_bucket, resolve_planner
from mumoe.spec import Network
from mumoe.typing import SparseGate

# TensorLy's pytorch backend, loaded (not selected) now: the modules' first forward pass
# switches to it without an import, which torch.compile could not trace.
BackendManager.load_backend("pytorch")

__all__ = [
    "check_gate_devices",
    "check_input",
    "device_type",
    "module_contract",
    "not_scriptable",
    "torch_forward",
]


def device_type(x: torch.Tensor) -> str:
    """``x.device.type``, without building a device object for CPU tensors.

    Parameters
    ----------
    x : torch.Tensor

    Returns
    -------
    str

    Examples
    --------
    >>> import torch
    >>> device_type(torch.zeros(1))
    'cpu'
    """
    return "cpu" if x.is_cpu else x.device.type


def _autocast(
    x: torch.Tensor, cores: Sequence[torch.Tensor], gates: Any
) -> tuple[torch.Tensor, Sequence[torch.Tensor], Sequence[Any]]:
    # Autocast casts the operands of torch's own matmuls; mumoe's operands
    # must share one dtype, so they are cast together, to autocast's dtype.
    device = device_type(x)
    if not torch.is_autocast_enabled(device):
        return x, cores, gates
    dtype = torch.get_autocast_dtype(device)
    if isinstance(gates, torch.Tensor | SparseGate):  # one level's gate, given alone
        gates = [gates]
    return x.to(dtype), [c.to(dtype) for c in cores], [_cast_gate(g, dtype) for g in gates]


def _cast_gate(gate: Any, dtype: torch.dtype) -> Any:
    if isinstance(gate, SparseGate):
        return SparseGate(gate.indices, gate.values.to(dtype), gate.n_experts)
    return gate.to(dtype)


def torch_forward(
    network: Network,
    cores: Sequence[torch.Tensor],
    x: torch.Tensor,
    gates: Sequence[torch.Tensor | SparseGate],
    planner: Planner | None = None,
) -> torch.Tensor:
    """:func:`mumoe.functional.forward` from torch: pytorch backend, grad mode respected.

    TensorLy's ``pytorch`` backend for this thread only, and ``differentiable``
    from torch's grad mode (it chooses how the bias is added).  Under
    ``torch.autocast``, every operand is cast to the autocast dtype, and so is
    the result, as for ``torch.nn.Linear``.

    Parameters
    ----------
    network : Network
    cores : sequence of torch.Tensor
        Of shapes ``network.core_shapes``.
    x : torch.Tensor, shape (..., I)
    gates : sequence of torch.Tensor (..., N_e) or SparseGate
    planner : Planner, optional
        A planner of ``network`` (:func:`mumoe.plan.planner_of` by default).

    Returns
    -------
    torch.Tensor, shape (..., O)

    Examples
    --------
    >>> import torch
    >>> from mumoe import cp
    >>> net = cp(3, 2, expert_dims=4, rank=5)
    >>> cores = [torch.randn(s, requires_grad=True) for s in net.core_shapes]
    >>> y = torch_forward(net, cores, torch.randn(6, 3), [torch.rand(6, 4)])
    >>> y.shape, y.requires_grad
    (torch.Size([6, 2]), True)
    """
    x, cores, gates = _autocast(x, cores, gates)
    differentiable = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
    with thread_backend("pytorch"):
        return functional.forward(
            network, cores, x, gates, planner=planner, differentiable=differentiable
        )


def module_contract(
    network: Network,
    cores: Sequence[torch.Tensor],
    x: torch.Tensor,
    gates: Sequence[Any],
    planner: Planner | None = None,
) -> torch.Tensor:
    """The recipe's contraction step for modules: :func:`torch_forward` without the core checks.

    The modules check their cores at construction and their input's dtype
    and device against them on every call, so the per-call walk over the
    cores is skipped; the caller has made ``pytorch`` TensorLy's backend for
    this thread.

    Parameters
    ----------
    network, cores, x, gates, planner
        As for :func:`torch_forward`; the planner is not checked against
        ``network`` (the modules hold their own).

    Returns
    -------
    torch.Tensor, shape (..., O)

    Examples
    --------
    >>> import torch
    >>> from mumoe import cp
    >>> from mumoe.backends import thread_backend
    >>> net = cp(3, 2, expert_dims=4, rank=5)
    >>> cores = [torch.randn(s) for s in net.core_shapes]
    >>> with thread_backend("pytorch"):
    ...     module_contract(net, cores, torch.randn(6, 3), [torch.rand(6, 4)]).shape
    torch.Size([6, 2])
    """
    if torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type):
        x, cores, gates = _autocast(x, cores, gates)
    differentiable = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
    if torch.compiler.is_compiling():
        _plan_before_tracing(resolve_planner(network, planner), math.prod(x.shape[:-1]), x.dtype)
    return functional.contract(
        network,
        cores,
        x,
        gates,
        planner=planner,
        differentiable=differentiable,
        backend="pytorch",
        check_x=False,
    )


def _plan_before_tracing(planner: Planner, rows: int, dtype: torch.dtype) -> None:
    # Under torch.compile the cached plan is read lock-free and traced through; a plan
    # not built yet is built outside the graph (a path search is not traceable): a graph
    # break, which fullgraph=True refuses: run the layer once on that batch size first.
    if planner.autotune or planner.cache.hit(("forward", batch_bucket(rows), "pytorch", dtype)):
        return
    if not _OUTSIDE_THE_GRAPH:  # made when first needed: torch.compiler.disable imports dynamo
        _OUTSIDE_THE_GRAPH.append(torch.compiler.disable(_build_plan))
    _OUTSIDE_THE_GRAPH[0](planner, rows, dtype)


_OUTSIDE_THE_GRAPH: list[Any] = []  # torch.compiler.disable(_build_plan)


def _build_plan(planner: Planner, rows: int, dtype: torch.dtype) -> None:
    planner.forward(rows, "pytorch", dtype)


def _other_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    # get_device() is an int, a cheaper test than comparing devices; it is -1 for both
    # CPU and meta tensors, whose mix computes garbage instead of failing.
    return a.get_device() != b.get_device() or a.is_meta != b.is_meta


def check_input(x: Any, in_features: int, weight: torch.Tensor | None = None) -> None:
    """Check a layer's input: a floating tensor ``(..., in_features)`` like ``weight``.

    Parameters
    ----------
    x : any
    in_features : int
    weight : torch.Tensor, optional
        A parameter of the layer: ``x`` must share its device (meta included)
        and dtype (unless ``torch.autocast`` is on).

    Raises
    ------
    TypeError
        For a non-tensor, an integer tensor, or another dtype.
    ValueError
        For another feature size or device.

    Examples
    --------
    >>> check_input(torch.zeros(2, 3), 4)
    Traceback (most recent call last):
    ...
    ValueError: input must have shape (..., 4) (in_features), got (2, 3)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__qualname__}")
    if torch.jit.is_tracing():
        not_scriptable()
    if torch.compiler.is_exporting() and not all(type(d) is int for d in x.shape):
        raise RuntimeError(
            "μMoE layers export with static shapes only: the compiled contraction depends on "
            "the batch size; export once per input shape (no dynamic_shapes), or use "
            "torch.compile, which recompiles per shape"
        )
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"input must have shape (..., {in_features}) (in_features), got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"input has dtype {x.dtype}; μMoE layers compute in floating point: cast it "
            "(x.float(), x.to(layer's dtype))"
        )
    if weight is None:
        return
    if _other_device(x, weight):
        raise ValueError(
            f"input is on {x.device} but the layer's parameters are on {weight.device}; "
            "move one of them (x.to(...) or layer.to(...))"
        )
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(device_type(x)):
        raise TypeError(
            f"input has dtype {x.dtype} but the layer's parameters are {weight.dtype}; "
            "cast one of them (x.to(dtype) or layer.to(dtype)), or run under torch.autocast"
        )


def check_gate_devices(gates: Any, x: torch.Tensor) -> None:
    """Check that given gates live on the input's device (meta included).

    Parameters
    ----------
    gates : torch.Tensor, SparseGate, or a sequence of them
    x : torch.Tensor

    Raises
    ------
    ValueError
        Naming the gate and both devices.

    Examples
    --------
    >>> check_gate_devices([torch.zeros(2, 3, device="meta")], torch.zeros(2, 4))
    Traceback (most recent call last):
    ...
    ValueError: gates[0] is on meta but the input is on cpu
    """
    on_cpu = x.is_cpu  # CPU against CPU, the common case, needs no device read
    single = isinstance(gates, torch.Tensor | SparseGate)
    for e, gate in enumerate([gates] if single else gates):
        parts = (gate.indices, gate.values) if isinstance(gate, SparseGate) else (gate,)
        for part in parts:
            if (
                isinstance(part, torch.Tensor)
                and not (on_cpu and part.is_cpu)
                and _other_device(part, x)
            ):
                raise ValueError(f"gates[{e}] is on {part.device} but the input is on {x.device}")


def gate_density(
    planner: Planner, x: torch.Tensor, cores: Sequence[torch.Tensor], sparsified: bool = False
) -> float:
    """The support density up to which a layer's gate hands its levels over as supports.

    :meth:`mumoe.plan.Planner.max_density` for this call: the rows of ``x``,
    whether gradients will flow to the cores (as the contraction decides
    it), the ``pytorch`` backend; 0 under ``torch.compile``, whose graphs
    cannot hold a data-dependent support size.

    Parameters
    ----------
    planner : Planner
        The planner of the layer that contracts the gates.
    x : torch.Tensor, shape (..., I)
    cores : sequence of torch.Tensor
        That layer's cores.
    sparsified : bool, default False
        Whether the gate selects its support from dense coefficients
        (entmax-1.5, sparsemax), which pays only on wide expert cores.

    Returns
    -------
    float
        0 where the gate should give dense coefficients.

    Examples
    --------
    >>> import torch
    >>> from mumoe import cp
    >>> from mumoe.plan import Planner
    >>> net = cp(64, 64, expert_dims=4096, rank=64)
    >>> cores = [torch.zeros(s) for s in net.core_shapes]
    >>> gate_density(Planner(net), torch.zeros(256, 64), cores)  # eval: 67M multiply-adds
    0.1
    >>> gate_density(Planner(net), torch.zeros(2, 64), cores)  # too small to gather
    0.0
    """
    if torch.compiler.is_compiling():
        return 0.0
    training = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return planner.max_density("pytorch", training, rows, sparsified)


def not_scriptable(*args: Any) -> None:
    """Refuse TorchScript (``torch.jit.script`` and ``torch.jit.trace``), saying what works.

    A μMoE layer's contraction is Python generated per batch size and its
    gate calls the ``entmax`` package: TorchScript can neither compile nor
    faithfully trace them.  ``torch.compile`` and ``torch.export`` (static
    shapes) work.

    Raises
    ------
    RuntimeError
        Always.

    Examples
    --------
    >>> not_scriptable()
    Traceback (most recent call last):
    ...
    RuntimeError: μMoE layers do not support TorchScript (torch.jit.script or torch.jit.trace): ...
    """
    raise RuntimeError(
        "μMoE layers do not support TorchScript (torch.jit.script or torch.jit.trace): their "
        "contraction is Python code generated per batch size; use torch.compile, or "
        "torch.export with static shapes"
    )
