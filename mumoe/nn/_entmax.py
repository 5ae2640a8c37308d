r"""entmax-1.5 and sparsemax for torch tensors: exact, with closed-form gradients.

The torch family's one implementation, by device:

* **CPU tensors** run :mod:`mumoe.gates.entmax_cpu`'s compiled kernels on NumPy
  views of the tensors (no copy): no sort, a few vectorised passes a row, and
  the closed-form backward pass in two more;
* **other devices** (CUDA) run :mod:`mumoe.gates.entmax`'s candidate-window
  algorithm: the ``WINDOW`` largest logits of each row selected by
  ``torch.topk`` and the threshold read from them, rows whose support fills
  the window done again with a window twice as wide, until it is exact; the
  support's coefficients are scattered into a zero tensor, and the backward
  pass gathers and scatters the support only;
* **traced** tensors (``torch.export``) take the whole row as the window (a
  ``torch.sort``): static shapes, nothing depending on the data.

The backward pass is the closed form (Peters et al., 2019):

* entmax-1.5: with :math:`s = \sqrt{p}`,
  :math:`\partial z = s \odot g - s\,\frac{\langle s, g\rangle}{\sum s}`;
* sparsemax: :math:`\partial z = [g - \bar g_S]_S` on :math:`S = \{p > 0\}`.

Second derivatives (``create_graph``) are exact: the backward pass is then
written in torch operations, reading :math:`s` from the output.

Under ``torch.compile`` the activation is one graph break
(:func:`torch.compiler.disable`): on the CPU around the compiled kernels, which
Dynamo does not trace; elsewhere around the selection, whose window sizes
depend on the data.  Half-precision logits are computed in
float32 and cast back (gates compute in float32 at least anyway,
:func:`mumoe.gates.gate_dtype`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mumoe.gates import entmax as window

__all__ = ["entmax15", "sparsemax"]

WIDE = (torch.float32, torch.float64)


def _select(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Indices (B, width) of each row's ``width`` largest logits, by decreasing value."""
    return torch.topk(rows, width, dim=-1, sorted=True).indices


def _window(
    rows: torch.Tensor, m: torch.Tensor, kind: str, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support size and the window's coefficients (before squaring), per row."""
    # Summed in float64: the prefix sums cancel, and in float32 a threshold came out 16 ulps
    # off (mumoe.gates.entmax).
    ordered = rows.gather(-1, index).sub_(m).double()
    width = index.shape[-1]
    rank = torch.arange(1, width + 1, dtype=ordered.dtype, device=rows.device)
    if kind == "sparsemax":
        cumulative = ordered.cumsum(-1).sub_(1)
        inside = rank * ordered > cumulative
        taus = cumulative.div_(rank)
    else:
        ordered.mul_(0.5)
        # The entmax package's tau_k = mean_k - sqrt((1 - ss_k) / k), with prefix sums
        # c1, c2 of u and u^2: (c1 - sqrt(c1^2 + k (1 - c2))) / k (mumoe.gates.entmax).
        c1, c2 = ordered.cumsum(-1), (ordered * ordered).cumsum(-1)
        taus = (c1 * c1).add_(rank * (1 - c2)).clamp_(min=0).sqrt_().neg_().add_(c1).div_(rank)
        inside = taus <= ordered
    # The threshold is the largest tau_k of the support (mumoe.gates.entmax); NaN rows: -inf.
    tau = taus.masked_fill_(~inside, -math.inf).amax(-1, keepdim=True)
    return inside.sum(-1, keepdim=True), (ordered - tau).clamp_(min=0).to(rows.dtype)


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` columns of ``x``, padded with zeros where it is narrower."""
    if x.shape[-1] >= width:
        return x[..., :width]
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[-1])], dim=-1)


def _eager_support(
    rows: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's support: indices and values ``(B, K)`` (zero-padded), and NaN rows ``(B,)``."""
    n = rows.shape[-1]
    m = rows.amax(-1, keepdim=True)
    width = min(n, window.WINDOW)
    index = _select(rows, width)
    support, values = _window(rows, m, kind, index)
    widened = []  # (rows, index, values) of the rows whose support filled their window
    largest = [support.max()]  # support sizes, an upper bound per stage
    pending = None
    while width < n:
        full = torch.nonzero(support[:, 0] >= width)[:, 0]
        if full.numel() == 0:
            break
        pending = full if pending is None else pending[full]
        width = min(2 * width, n)
        wide_index = _select(rows[pending], width)
        support, wide_values = _window(rows[pending], m[pending], kind, wide_index)
        widened.append((pending, wide_index, wide_values))
        largest.append(support.max())
    k = max(int(max(largest)), 1)
    index, values = _fit(index, k), _fit(values, k)
    for chosen, wide_index, wide_values in widened:
        index[chosen], values[chosen] = _fit(wide_index, k), _fit(wide_values, k)
    return index, values, ~torch.isfinite(m[:, 0])  # NaN, +inf, or all -inf


def _traced_support(
    rows: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_eager_support` in torch alone, with static shapes: for ``torch.export``.

    The window is the whole row (a ``torch.sort``), so nothing depends on the data.
    """
    m = rows.amax(-1, keepdim=True)
    index = torch.sort(rows, dim=-1, descending=True).indices
    _, values = _window(rows, m, kind, index)
    return index, values, ~torch.isfinite(m[:, 0])  # NaN, +inf, or all -inf


_GRAPH_BREAK: list[Any] = []  # torch.compiler.disable(_eager_support), made when first needed
_CPU_GRAPH_BREAK: list[Any] = []  # torch.compiler.disable(_on_cpu), likewise


def _support(rows: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if torch.compiler.is_exporting() or (
        type(rows) is not torch.Tensor and not torch.compiler.is_compiling()
    ):
        return _traced_support(rows, kind)  # fake tensors: static shapes
    if torch.compiler.is_compiling():
        # One graph break under torch.compile: the window sizes depend on the data.
        # (Made lazily: torch.compiler.disable imports torch._dynamo.)
        if not _GRAPH_BREAK:
            _GRAPH_BREAK.append(torch.compiler.disable(_eager_support))
        return _GRAPH_BREAK[0](rows, kind)
    return _eager_support(rows, kind)


_KIND = {"entmax15": 0, "sparsemax": 1}  # mumoe.gates.entmax_cpu's ENTMAX15, SPARSEMAX


def _compiled(z: torch.Tensor) -> bool:
    """Whether ``z`` runs on :mod:`mumoe.gates.entmax_cpu`: a plain CPU tensor, eagerly."""
    # (torch.export's tensors are fake, of a subclass; Dynamo's trace is compiling.)
    return z.is_cpu and type(z) is torch.Tensor and not torch.compiler.is_compiling()


def _kernels() -> Any:
    """:mod:`mumoe.gates.entmax_cpu`, imported (and its kernels compiled) when first needed."""
    if not _ENTMAX_CPU:
        from mumoe.gates import entmax_cpu

        _ENTMAX_CPU.append(entmax_cpu)
    return _ENTMAX_CPU[0]


_ENTMAX_CPU: list[Any] = []


def _rows(a: np.ndarray) -> np.ndarray:
    return (
        a
        if a.ndim == 2 and a.flags.c_contiguous
        else np.ascontiguousarray(a.reshape(-1, a.shape[-1]))
    )


def _on_cpu(kind: str, z: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The activation of CPU logits ``z`` by :mod:`mumoe.gates.entmax_cpu` (NumPy views, no copy).

    With ``grad``, ``z`` is the activation's output and the result its input's gradient.
    """
    # Every call here is a few hundred nanoseconds of a one-token gate's budget.
    kernels = _kernels()
    logits = z.numpy(force=True)
    out = np.empty(logits.shape, dtype=logits.dtype)
    if out.size:
        rows, result = _rows(logits), out.reshape(-1, logits.shape[-1])
        # (entmax_cpu's own wrappers would validate and convert dtypes too: 1.5 µs more
        # a call, a third of a one-token gate's.)
        arrays = [rows, result] if grad is None else [rows, _rows(grad.numpy(force=True)), result]
        kernel = kernels._forward if grad is None else kernels._backward
        kernels.run(kernel, arrays, _KIND[kind], torch.get_num_threads())
    return torch.from_numpy(out)  # (not .view(shape): that costs as much as the kernel)


def _forward(
    z: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The coefficients (shape of ``z``), and the support's indices and values (B, K).

    The support is None where the coefficients were computed by :mod:`mumoe.gates.entmax_cpu`.
    """
    n = z.shape[-1]
    if z.numel() == 0 or n == 0:
        return torch.zeros_like(z), None, None
    if _compiled(z):
        return _on_cpu(kind, z), None, None
    if z.is_cpu and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        # One graph break under torch.compile, around the compiled kernels (Numba's,
        # which Dynamo does not trace).  (Made lazily: it imports torch._dynamo.)
        if not _CPU_GRAPH_BREAK:
            _CPU_GRAPH_BREAK.append(torch.compiler.disable(_on_cpu))
        return _CPU_GRAPH_BREAK[0](kind, z.detach()), None, None
    rows = z.detach().reshape(-1, n)
    plain = type(rows) is torch.Tensor and not torch.compiler.is_compiling()
    index, values, bad_rows = _support(rows, kind)
    coefficients = values * values if kind == "entmax15" else values
    p = torch.zeros_like(rows).scatter_add_(-1, index, coefficients)
    if not plain:  # traced: no data-dependent branch
        p = torch.where(bad_rows[:, None], float("nan"), p)
    elif bool(bad_rows.any()):
        p[bad_rows] = float("nan")
    return p.reshape(z.shape), index, values


def _root(p: torch.Tensor) -> torch.Tensor:
    """``sqrt(p)`` with a zero derivative where ``p == 0`` (not ``0 * inf``: NaN)."""
    inside = p > 0
    return torch.where(inside, torch.where(inside, p, 1).sqrt(), 0)


def _keep_support(ctx: Any, z: torch.Tensor, kind: str) -> torch.Tensor:
    """Forward pass of both Functions: the coefficients, their support kept on ``ctx``."""
    p, index, values = _forward(z, kind)
    ctx.save_for_backward(p, index, values)
    return p


def _on_support(
    grad: torch.Tensor, index: torch.Tensor | None, backward: Any, weights: torch.Tensor
) -> torch.Tensor:
    """``backward(g, weights)`` on the support, ``(B, K)``, scattered back to ``grad``'s shape.

    Without an index (the dense path) it runs on every entry, ``weights`` being ``(B, N)``.
    """
    rows = grad.reshape(-1, grad.shape[-1])
    if index is None or index.shape[-1] == 0:
        return backward(rows, weights).reshape(grad.shape)
    d = backward(rows.gather(-1, index), weights)
    return torch.zeros_like(rows).scatter_add(-1, index, d).reshape(grad.shape)


def _entmax15_backward(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    gs = g * s
    return gs - s * (gs.sum(-1, keepdim=True) / s.sum(-1, keepdim=True))


def _sparsemax_backward(g: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    g = g * inside
    return (g - g.sum(-1, keepdim=True) / inside.sum(-1, keepdim=True)) * inside


class _Entmax15(torch.autograd.Function):
    # The classic form (ctx in forward): one output, and the support kept without
    # returning it; a third cheaper per call than setup_context's three outputs.
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        return _keep_support(ctx, z, "entmax15")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        p, index, s = ctx.saved_tensors
        if index is None and not torch.is_grad_enabled() and _compiled(grad):
            return _on_cpu("entmax15", p, grad)
        dense = index is None or index.shape[-1] == 0
        p = p.reshape(-1, p.shape[-1])
        if dense:
            s = _root(p)
        elif torch.is_grad_enabled():  # create_graph: s from the output, so that it has a graph
            s = _root(p.gather(-1, index))
        return _on_support(grad, index, _entmax15_backward, s)


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        return _keep_support(ctx, z, "sparsemax")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        p, index, values = ctx.saved_tensors
        if index is None and not torch.is_grad_enabled() and _compiled(grad):
            return _on_cpu("sparsemax", p, grad)
        dense = index is None or index.shape[-1] == 0
        support = p.reshape(-1, p.shape[-1]) if dense else values
        return _on_support(grad, index, _sparsemax_backward, (support > 0).to(grad.dtype))


def _run(function: Any, z: torch.Tensor, kind: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{kind} expects a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{kind} expects floating-point logits, got {z.dtype}")
    if z.ndim == 0:
        raise ValueError(f"{kind} expects logits of shape (..., N), got a scalar")
    if z.dtype not in WIDE:  # float16 / bfloat16: float32 inside, the input's dtype out
        return _run(function, z.float(), kind).to(z.dtype)
    if torch.is_grad_enabled() and z.requires_grad:
        return function.apply(z)
    # No graph: skip autograd.Function's cost.
    return _on_cpu(kind, z) if _compiled(z) else _forward(z, kind)[0]


def entmax15(z: torch.Tensor) -> torch.Tensor:
    """entmax-1.5 over the last dimension, exact, with its closed-form gradient.

    Parameters
    ----------
    z : torch.Tensor, shape (..., N)
        Logits, floating point.

    Returns
    -------
    torch.Tensor, shape (..., N)
        Non-negative, summing to one over the last dimension, exact zeros
        outside the support.  A row with a NaN or ``+inf`` logit, or with
        every logit ``-inf``, gives NaNs (as softmax); a ``-inf`` logit gets 0.

    Examples
    --------
    >>> import torch
    >>> entmax15(torch.tensor([[0.0, 0.0], [3.0, -3.0]]))
    tensor([[0.5000, 0.5000],
            [1.0000, 0.0000]])
    """
    return _run(_Entmax15, z, "entmax15")


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dimension, exact, with its closed-form gradient.

    Parameters
    ----------
    z : torch.Tensor, shape (..., N)
        Logits, floating point.

    Returns
    -------
    torch.Tensor, shape (..., N)
        Non-negative, summing to one over the last dimension (see :func:`entmax15`
        for non-finite logits).

    Examples
    --------
    >>> import torch
    >>> sparsemax(torch.tensor([[2.0, 1.0, -1.0]]))
    tensor([[1., 0., 0.]])
    """
    return _run(_Sparsemax, z, "sparsemax")
