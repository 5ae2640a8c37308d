"""Distillation: a submodule's (input, output) pairs streamed from a model, and a block fit to them.

:class:`ActivationPairs` runs a model over an iterable of batches (a
``DataLoader``, a list of dicts) and streams the rows a submodule reads and
writes, padding left out, through a shuffle buffer of bounded size: memory
grows with the buffer, never with the dataset.  :func:`distill` trains a
replacement (a :class:`~mumoe.nn.MuMoEBlock` from
:func:`~mumoe.nn.block_from_mlp`, say) on them by normalised MSE, optionally
resampling the gate of experts no token used (:class:`~mumoe.nn.ExpertMonitor`
finds them), and returns what the fit did: NMSE, FVU, L0 and dead experts.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mumoe.nn._gate import MuMoEGate
from mumoe.nn._monitor import ExpertMonitor
from mumoe.validation import positive_int

__all__ = ["ActivationPairs", "DistillHistory", "distill", "fit_metrics"]


class _Captured(Exception):
    """Raised by the output hook: the rest of the model need not run."""


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


class ActivationPairs:
    """The rows a submodule of ``model`` reads and writes over ``data``, shuffled, in batches.

    Iterating runs ``model`` (in eval mode, without gradients) over ``data``
    once; a forward hook on ``inputs_of`` takes its first positional input
    and one on ``outputs_of`` its output, the model stopping there.  Rows go
    through a buffer of ``buffer_size`` rows: once full it is shuffled and
    half of it is yielded in batches of ``batch_size``, so memory is bounded
    by the buffer, not by the dataset.  Iterate again for another pass.

    Parameters
    ----------
    model : torch.nn.Module
    data : iterable
        Batches: a mapping is passed as keyword arguments (a tokenizer's
        output), a tuple or list positionally, anything else as the one
        argument.
    inputs_of : str
        Qualified name of the submodule whose input is taken (an MLP; a split
        MLP's ``intermediate``).
    outputs_of : str, optional
        Qualified name of the submodule whose output is taken; ``inputs_of``
        by default (a split MLP: its ``output.dense``).
    batch_size : int, default 256
        Rows per yielded pair.
    buffer_size : int, default 16384
        Rows the shuffle buffer holds.
    mask_key : str, default "attention_mask"
        In a mapping batch, the padding mask ``(B, T)`` (1 for tokens): only
        rows of tokens are kept.
    seed : int, default 0
        Of the shuffle.

    Raises
    ------
    ValueError
        On iteration: if ``data`` yields no batch, a mask's shape does not
        match the rows, or every token is masked.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> data = [torch.randn(5, 4) for _ in range(3)]
    >>> pairs = ActivationPairs(model, data, inputs_of="2", batch_size=4, buffer_size=8)
    >>> [tuple(x.shape) + tuple(y.shape) for x, y in pairs][:2]
    [(4, 8, 4, 4), (4, 8, 4, 4)]
    >>> sum(len(x) for x, _ in pairs)  # every row, once a pass
    15
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        inputs_of: str,
        outputs_of: str | None = None,
        batch_size: int = 256,
        buffer_size: int = 16384,
        mask_key: str = "attention_mask",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.data = data
        self.inputs_of = inputs_of
        self.outputs_of = outputs_of or inputs_of
        for name in (self.inputs_of, self.outputs_of):  # an AttributeError naming it, now
            model.get_submodule(name)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.buffer_size = positive_int(buffer_size, "buffer_size")
        if self.buffer_size < self.batch_size:
            raise ValueError(
                f"buffer_size ({buffer_size}) must hold at least one batch ({batch_size})"
            )
        self.mask_key = mask_key
        self.seed = seed

    def _rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # One (inputs, outputs) pair of row matrices per batch of data, padding left out.
        model = self.model
        taken: dict[str, torch.Tensor] = {}

        def take_input(_: nn.Module, args: tuple[Any, ...]) -> None:
            taken["x"] = args[0]

        def take_output(_: nn.Module, __: Any, output: Any) -> None:
            taken["y"] = output[0] if isinstance(output, tuple) else output
            raise _Captured

        handles = [
            model.get_submodule(self.inputs_of).register_forward_pre_hook(take_input),
            model.get_submodule(self.outputs_of).register_forward_hook(take_output),
        ]
        training = model.training
        model.eval()
        batches = tokens = 0
        try:
            for batch in self.data:
                batches += 1
                taken.clear()
                with torch.no_grad():
                    try:
                        _call(model, batch)
                    except _Captured:
                        pass
                if "y" not in taken:
                    raise ValueError(f"{self.outputs_of!r} did not run on a batch of data")
                x, y = taken["x"], taken["y"]
                x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
                mask = batch.get(self.mask_key) if isinstance(batch, Mapping) else None
                if mask is not None:
                    keep = torch.as_tensor(mask).reshape(-1).to(x.device) != 0
                    if keep.shape[0] != x.shape[0]:
                        raise ValueError(
                            f"the batch's {self.mask_key!r} covers {keep.shape[0]} tokens, the "
                            f"submodule saw {x.shape[0]} rows"
                        )
                    x, y = x[keep], y[keep]
                tokens += x.shape[0]
                if x.shape[0]:
                    yield x, y
        finally:
            for handle in handles:
                handle.remove()
            model.train(training)
        if not batches:
            raise ValueError("data yielded no batches")
        if not tokens:
            raise ValueError(f"every token of data was masked out by {self.mask_key!r}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        held = 0

        def flush(keep: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            nonlocal xs, ys, held
            x, y = torch.cat(xs), torch.cat(ys)
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            x, y = x[order], y[order]
            out = x.shape[0] - keep
            for start in range(0, out, self.batch_size):
                stop = min(start + self.batch_size, out)
                yield x[start:stop], y[start:stop]
            xs, ys, held = [x[out:]], [y[out:]], keep

        for x, y in self._rows():
            xs.append(x)
            ys.append(y)
            held += x.shape[0]
            if held >= self.buffer_size:
                # Yield whole batches from the shuffled buffer, keep half of it to mix.
                keep = held - (held - self.buffer_size // 2) // self.batch_size * self.batch_size
                yield from flush(keep)
        if held:
            yield from flush(0)


def fit_metrics(
    prediction: torch.Tensor, target: torch.Tensor, gates: list[torch.Tensor] | None = None
) -> dict[str, float]:
    r"""How well ``prediction`` fits ``target``, and how sparse the gates were.

    * ``nmse``: :math:`\|y - \hat y\|^2 / \|y\|^2`;
    * ``fvu``: the fraction of variance unexplained,
      :math:`\|y - \hat y\|^2 / \|y - \bar y\|^2` (:math:`\bar y` the mean row);
    * ``l0``: the mean number of experts a row used (non-zero coefficients,
      multiplied over the levels).

    Parameters
    ----------
    prediction, target : torch.Tensor, shape (B, O)
    gates : list of torch.Tensor, each (B, N_e), optional

    Returns
    -------
    dict of str to float

    Examples
    --------
    >>> y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> fit_metrics(torch.zeros(2, 2), y)
    {'nmse': 1.0, 'fvu': 2.0}
    """
    prediction, target = prediction.detach(), target.detach()
    error = (prediction - target).square().sum()
    out = {
        "nmse": float(error / target.square().sum().clamp_min(1e-30)),
        "fvu": float(error / (target - target.mean(0)).square().sum().clamp_min(1e-30)),
    }
    if gates:
        active = torch.ones(gates[0].reshape(-1, gates[0].shape[-1]).shape[0])
        for a in gates:
            active = active * (a.detach().reshape(-1, a.shape[-1]) != 0).sum(-1).cpu().float()
        out["l0"] = float(active.mean())
    return out


@dataclass
class DistillHistory:
    """What :func:`distill` did, one entry per logged step.

    Parameters
    ----------
    step : list of int
    nmse, fvu, l0 : list of float
        On each logged step's batch, before its update (:func:`fit_metrics`).
    dead : list of int
        Experts (over every level; a transcoder's latents) no token used in
        the last :data:`DEAD_WINDOW` steps.
    resampled : int
        Experts whose gate was resampled.

    Examples
    --------
    >>> DistillHistory(step=[10], nmse=[0.25], fvu=[0.3], l0=[4.0], dead=[0]).nmse
    [0.25]
    """

    step: list[int] = field(default_factory=list)
    nmse: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    resampled: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The history as plain lists (for JSON).

        Examples
        --------
        >>> DistillHistory(step=[1], nmse=[0.5]).as_dict()["nmse"]
        [0.5]
        """
        return {
            "step": self.step,
            "nmse": self.nmse,
            "fvu": self.fvu,
            "l0": self.l0,
            "dead": self.dead,
            "resampled": self.resampled,
        }


def distill(
    block: nn.Module,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    resample_every: int | None = None,
    log_every: int = 1,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillHistory:
    r"""Train ``block`` to map ``pairs``' inputs to their outputs, by normalised MSE.

    The loss of a batch is :math:`\|y - \hat y\|^2 / \|y\|^2`.  ``pairs`` is
    iterated again from the start whenever it ends before ``steps``.

    With ``resample_every``, every so many steps the gate of each expert
    that no token used since the last resampling (found by an
    :class:`~mumoe.nn.ExpertMonitor` over that window) is reset: its
    projection column to the direction of one of the batch's worst-fitted
    inputs, at the mean norm of the live columns, and its bias (if any) to
    the live experts' mean, so that it can fire again.

    Parameters
    ----------
    block : torch.nn.Module
        Called as ``block(x, return_gates=True)`` where it takes the keyword
        (:class:`~mumoe.nn.MuMoEBlock`, :class:`~mumoe.nn.Transcoder`: L0 and
        dead experts come from those gates), else ``block(x)``.
    pairs : iterable of (x, y)
        Such as :class:`ActivationPairs`; re-iterable.
    steps : int
        Optimiser steps.
    lr : float, default 1e-3
        Of the default optimiser, Adam over every parameter of ``block``.
    optimizer : torch.optim.Optimizer, optional
    resample_every : int, optional
        Resample dead experts' gates every so many steps (needs a gate).
    log_every : int, default 1
        Record the metrics every so many steps.
    on_step : callable, optional
        Called as ``on_step(step, metrics)`` on every logged step.

    Returns
    -------
    DistillHistory

    Raises
    ------
    ValueError
        If ``pairs`` yields nothing, or resampling is asked of a block without a gate.

    Examples
    --------
    >>> from mumoe.nn import block_from_mlp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> target = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    >>> x = torch.randn(512, 8)
    >>> pairs = [(x[i : i + 64], target(x[i : i + 64]).detach()) for i in range(0, 512, 64)]
    >>> block = block_from_mlp(nn.Linear(8, 32), nn.Linear(32, 8), "mxd", expert_dims=16,
    ...                        activation="relu_topk", top_k=4, normalization=None,
    ...                        gate_bias=True)
    >>> history = distill(block, pairs, steps=200, lr=1e-2)
    >>> history.nmse[-1] < history.nmse[0] / 10
    True
    """
    steps = positive_int(steps, "steps")
    log_every = positive_int(log_every, "log_every")
    gates = [(n, m) for n, m in block.named_modules() if isinstance(m, MuMoEGate)]
    if resample_every is not None:
        resample_every = positive_int(resample_every, "resample_every")
        if len(gates) != 1:
            raise ValueError(
                f"resampling dead experts needs a block with one gate, found {len(gates)}"
            )
    if optimizer is None:
        optimizer = torch.optim.Adam(block.parameters(), lr=lr)
    returns_gates = "return_gates" in inspect.signature(block.forward).parameters
    history = DistillHistory()
    monitor = ExpertMonitor(block, window=resample_every) if resample_every else None
    # Which experts (or latents) each of the last DEAD_WINDOW steps used, per level.
    used: deque[list[torch.Tensor]] = deque(maxlen=DEAD_WINDOW)
    block.train()
    step = 0
    try:
        while step < steps:
            seen = False
            for x, y in pairs:
                seen = True
                if returns_gates:
                    prediction, batch_gates = block(x, return_gates=True)
                else:
                    prediction, batch_gates = block(x), None
                loss = (prediction - y).square().sum() / y.square().sum().clamp_min(1e-30)
                if batch_gates:
                    used.append(
                        [(a.detach() != 0).reshape(-1, a.shape[-1]).any(0) for a in batch_gates]
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if step % log_every == 0 or step == steps:
                    metrics = fit_metrics(prediction.detach(), y, batch_gates)
                    n_dead = _dead(used)
                    history.step.append(step)
                    history.nmse.append(metrics["nmse"])
                    history.fvu.append(metrics["fvu"])
                    history.l0.append(metrics.get("l0", math.nan))
                    history.dead.append(n_dead)
                    if on_step is not None:
                        on_step(step, {**metrics, "dead": n_dead})
                if monitor is not None and step % resample_every == 0:  # type: ignore[operator]
                    history.resampled += _resample(*gates[0], monitor, x, prediction, y)
                    monitor.close()
                    monitor = ExpertMonitor(block, window=resample_every)  # type: ignore[arg-type]
                    used.clear()
                if step >= steps:
                    break
            if not seen:
                raise ValueError("pairs yielded nothing to distill on")
    finally:
        if monitor is not None:
            monitor.close()
    return history


#: The steps over which :func:`distill` counts an expert dead: no token used it.
DEAD_WINDOW = 100


def _used(gates: torch.Tensor) -> torch.Tensor:
    return (gates.detach() != 0).reshape(-1, gates.shape[-1]).any(0)


def _dead(used: deque[list[torch.Tensor]]) -> int:
    if not used:
        return 0
    levels = zip(*used, strict=True)
    return int(sum(int((~torch.stack(masks).any(0)).sum()) for masks in levels))


def _resample(
    name: str,
    gate: MuMoEGate,
    monitor: ExpertMonitor,
    x: torch.Tensor,
    prediction: torch.Tensor,
    y: torch.Tensor,
) -> int:
    # Reset the gate of experts the window never used towards the worst-fitted inputs.
    if monitor.steps == 0:
        return 0
    errors = (prediction.detach() - y).square().sum(-1)
    worst = torch.argsort(errors, descending=True)
    directions = x.detach()[worst]
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    count = 0
    with torch.no_grad():
        for level, projection in enumerate(gate.projections):
            dead = monitor.dead_experts(name, level)
            if not dead:
                continue
            alive = [n for n in range(projection.shape[1]) if n not in set(dead)]
            columns = projection[:, alive] if alive else projection
            norm = columns.norm(dim=0).mean()
            for k, n in enumerate(dead):
                projection[:, n] = directions[k % len(directions)].to(projection) * norm
                if gate.biases is not None:
                    bias = gate.biases[level]
                    bias[n] = bias[alive].mean() if alive else 0.0
            count += len(dead)
    return count
