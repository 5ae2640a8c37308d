r"""Steering a model by its experts: set, clamp or scale chosen experts' gate coefficients.

:func:`steer_experts` changes what the gates hand the contraction, for a
``with`` block: a forward hook on each chosen :class:`~mumoe.nn.MuMoEGate`
rewrites its coefficients (MxD's ``a_hook``), in training and in eval, for
every layer kind that has a gate.  It acts on the coefficients, where
:func:`~mumoe.nn.edit_experts` scales the experts' weights; the two compose
(their factors multiply for the experts both scale).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mumoe.nn._analysis import gate_names
from mumoe.nn._gate import MuMoEGate, dense_coefficients
from mumoe.typing import SparseGate

__all__ = ["steer_experts"]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _plan(
    n: int,
    scale: Mapping[int, float],
    clamp: Mapping[int, tuple[float | None, float | None]],
    values: Mapping[int, float],
    where: str,
) -> tuple[list[float], list[float], list[float], list[float | None]]:
    factors, lows, highs = [1.0] * n, [-math.inf] * n, [math.inf] * n
    fixed: list[float | None] = [None] * n
    for name, edits in (("scale", scale), ("clamp", clamp), ("values", values)):
        if not isinstance(edits, Mapping):
            raise TypeError(f"{name} must be a mapping {{expert: ...}}, got {edits!r}")
        for expert, edit in edits.items():
            if isinstance(expert, bool) or not isinstance(expert, int) or not -n <= expert < n:
                raise ValueError(
                    f"{name}: expert {expert!r} is not an index of {where} ({n} experts)"
                )
            if name == "scale":
                factors[expert] = _number(edit, f"scale[{expert}]")
            elif name == "clamp":
                if not isinstance(edit, tuple | list) or len(edit) != 2:
                    raise ValueError(f"clamp[{expert}] must be (low, high), got {edit!r}")
                low = -math.inf if edit[0] is None else _number(edit[0], f"clamp[{expert}] low")
                high = math.inf if edit[1] is None else _number(edit[1], f"clamp[{expert}] high")
                if low > high:
                    raise ValueError(f"clamp[{expert}] has low {low} > high {high}")
                lows[expert], highs[expert] = low, high
            else:
                fixed[expert] = _number(edit, f"values[{expert}]")
    return factors, lows, highs, fixed


def _steered(
    a: torch.Tensor | SparseGate,
    plan: tuple[list[float], list[float], list[float], list[float | None]],
) -> torch.Tensor | SparseGate:
    factors, lows, highs, fixed = plan
    scaled_only = all(math.isinf(v) for v in lows + highs) and all(v is None for v in fixed)
    if isinstance(a, SparseGate):
        if scaled_only:  # linear in each entry: the support stays a support
            factor = torch.tensor(factors, dtype=a.values.dtype, device=a.values.device)
            return SparseGate(a.indices, a.values * factor[a.indices], a.n_experts)
        (a,) = dense_coefficients([a])
    options: dict[str, Any] = {"dtype": a.dtype, "device": a.device}
    a = a * torch.tensor(factors, **options)
    if not scaled_only:
        a = torch.maximum(a, torch.tensor(lows, **options))
        a = torch.minimum(a, torch.tensor(highs, **options))
        is_fixed = torch.tensor([v is not None for v in fixed], device=a.device)
        value = torch.tensor([0.0 if v is None else v for v in fixed], **options)
        a = torch.where(is_fixed, value, a)
    return a


#: A gate's steering in force, outermost first, and its hook (in the gate's __dict__).
_STEERS = "_mumoe_steering"
_HOOK = "_mumoe_steering_hook"
_LOCK = threading.Lock()


def _apply_steers(gate: nn.Module, _: Any, output: list[Any]) -> list[Any] | None:
    steers = gate.__dict__.get(_STEERS)
    if not steers:
        return None
    steered = list(output)
    for level, plan in list(steers):  # the outer block's first: the inner steers what it gives
        steered[level] = _steered(steered[level], plan)
    return steered


@contextmanager
def steer_experts(
    model: nn.Module,
    *,
    scale: Mapping[int, float] | None = None,
    clamp: Mapping[int, tuple[float | None, float | None]] | None = None,
    values: Mapping[int, float] | None = None,
    level: int = 0,
    gates: str | Sequence[str] | None = None,
) -> Iterator[None]:
    r"""Inside the block, the chosen experts' gate coefficients are scaled, clamped or set.

    For each chosen gate, the coefficients of ``level`` become
    ``a[n] * scale[n]``, then clamped to ``clamp[n] = (low, high)`` (None: no
    bound), then set to ``values[n]``; other experts keep theirs, and nothing
    is renormalised.  It works in training (gradients flow through the
    scaled and clamped coefficients; a set one is a constant) and in eval,
    for every layer and block with a gate; a level handed over as a support
    (:class:`mumoe.SparseGate`) stays one when only scaled, and is made dense
    otherwise.  ``return_gates`` and :func:`mumoe.nn.record_gates` see the
    steered coefficients; a gate's balance loss is computed before steering.
    It composes with :func:`mumoe.nn.edit_experts` (factors multiply) and
    with itself (the inner block steers what the outer one gives).  Like an
    expert edit, steering holds for every thread's calls while it lasts.

    Parameters
    ----------
    model : torch.nn.Module
    scale : mapping {expert: factor}, optional
    clamp : mapping {expert: (low, high)}, optional
    values : mapping {expert: coefficient}, optional
        Experts by index at ``level`` (negative indices count from the end).
    level : int, default 0
        The expert level.
    gates : str or sequence of str, optional
        The gates to steer, by the qualified name of the gate or of the layer
        or block holding it; every gate of the model by default (each must
        then have the experts named).

    Raises
    ------
    TypeError
        If ``model`` holds no gate, or an edit is not a mapping.
    ValueError
        If a name is not a gate or a layer holding one (the message lists the
        gates), ``level`` or an expert is out of range for a chosen gate, a
        value is not finite, or a clamp's low is above its high.  Nothing is
        hooked then.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import CPMuMoE
    >>> layer = CPMuMoE(8, 3, expert_dims=4, rank=2).eval()
    >>> x = torch.randn(2, 8)
    >>> with steer_experts(layer, values={0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}):
    ...     _, gates = layer(x, return_gates=True)
    >>> gates[0].tolist()  # every row routed to expert 0 alone
    [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    """
    names = gate_names(model, gates)
    plans = {}
    for name in names:
        gate = model.get_submodule(name)
        assert isinstance(gate, MuMoEGate)
        if (
            isinstance(level, bool)
            or not isinstance(level, int)
            or not 0 <= level < len(gate.expert_dims)
        ):
            raise ValueError(
                f"level must be in [0, {len(gate.expert_dims)}) for the gate {name!r} of "
                f"expert_dims {gate.expert_dims}, got {level!r}"
            )
        where = f"level {level} of the gate {name!r}"
        plans[name] = _plan(gate.expert_dims[level], scale or {}, clamp or {}, values or {}, where)

    entries = []
    with _LOCK:
        for name, plan in plans.items():
            gate = model.get_submodule(name)
            steers = gate.__dict__.setdefault(_STEERS, [])
            if not steers:  # the gate's one steering hook, ahead of every other hook
                gate.__dict__[_HOOK] = gate.register_forward_hook(_apply_steers, prepend=True)
            entry = (level, plan)
            steers.append(entry)
            entries.append((gate, entry))
    try:
        yield
    finally:
        with _LOCK:
            for gate, entry in entries:
                steers = gate.__dict__[_STEERS]
                steers.remove(entry)  # by identity: equal plans of other blocks stay
                if not steers:
                    gate.__dict__.pop(_HOOK).remove()
