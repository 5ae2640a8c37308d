"""Expert health in a torch training loop: padding masks, balance losses, a usage monitor.

:func:`gate_mask` tells every gate of a model which tokens are padding, for
one forward pass; :func:`collect_aux_losses` sums the balance losses that
gates built with ``balance`` set on their last forward pass, and
:func:`reduce_balance_over` makes them the global batch's over a process
group; :class:`ExpertMonitor` keeps a bounded window of each gate's
:func:`mumoe.gates.usage` (this process's or the group's) and hands back
plain floats for any logger, and the history of the expert mass for a
heatmap (:func:`mumoe.plotting.plot_usage`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mumoe.backends import thread_backend
from mumoe.gates import Usage, usage
from mumoe.nn._bonds import BondRegularizer
from mumoe.nn._distributed import check_process_group, group_sum
from mumoe.nn._gate import MuMoEGate, dense_coefficients

__all__ = ["ExpertMonitor", "collect_aux_losses", "gate_mask", "reduce_balance_over"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _gates(model: nn.Module) -> list[tuple[str, MuMoEGate]]:
    gates = [(name, m) for name, m in model.named_modules() if isinstance(m, MuMoEGate)]
    if not gates:
        raise ValueError(
            f"{type(model).__name__} has no MuMoEGate: a layer built with gated=False takes "
            "its gates as an argument, and mumoe.gates.usage measures those directly"
        )
    return gates


@contextmanager
def gate_mask(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Leave padding out of every gate's balance losses and monitor statistics.

    Parameters
    ----------
    model : torch.nn.Module
        Every :class:`MuMoEGate` inside it takes the mask.
    mask : torch.Tensor, shape (...) matching the tokens
        1 (True) for a token, 0 for padding, such as a tokenizer's
        ``attention_mask``; each gate checks it against its input's shape.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(8, 4, "cp", expert_dims=6, rank=2, balance={"uniform_kl": 1.0})
    >>> x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    >>> with gate_mask(layer, mask):
    ...     _ = layer(x)
    >>> layer.gate.aux_loss.shape, layer.gate.mask is None
    (torch.Size([]), True)
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    gates = _gates(model)
    previous = [gate.mask for _, gate in gates]
    for _, gate in gates:
        gate.mask = mask
    try:
        yield
    finally:
        for (_, gate), old in zip(gates, previous, strict=True):
            gate.mask = old


def collect_aux_losses(model: nn.Module) -> torch.Tensor:
    """The sum of the balance losses and bond lassos ``model`` set on its last forward pass.

    Add it to the task loss before ``backward()``.  Gates without ``balance``
    and layers without a lasso (:func:`mumoe.nn.regularize_bonds`) contribute
    nothing; nothing is kept between calls (each ``aux_loss`` is replaced by
    the next forward pass).

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.Tensor, shape ()
        0 when no gate has a loss.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(8, 4, "cp", expert_dims=6, rank=2, balance={"z_loss": 1e-3})
    >>> loss = layer(torch.randn(5, 8)).square().mean() + collect_aux_losses(layer)
    >>> loss.backward()
    """
    losses = [gate.aux_loss for _, gate in _gates(model) if gate.aux_loss is not None]
    losses += [  # the bond lassos (mumoe.nn.regularize_bonds)
        m.aux_loss
        for m in model.modules()
        if isinstance(m, BondRegularizer) and m.aux_loss is not None
    ]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0]) for loss in losses]).sum()


def reduce_balance_over(
    model: ModuleT, process_group: dist.ProcessGroup | bool | None = True
) -> ModuleT:
    """Make every gate's balance losses the global batch's: summed over ``process_group``.

    Each :class:`MuMoEGate` with ``balance`` then sums its per-expert sums
    and token counts over the group's processes before it normalises them
    (``reduce`` of :func:`mumoe.gates.balance_loss`), in training mode:
    :attr:`MuMoEGate.aux_loss` is the loss of every process's batch
    together, padding from :func:`gate_mask` left out on each, and its
    gradient, averaged over the processes by DDP or FSDP, is the gradient of
    that loss.  As with ``torch.nn.SyncBatchNorm``, every process must run
    the same gates the same number of times per training step, and
    backpropagate through every ``aux_loss`` (add
    :func:`collect_aux_losses` to the loss on every process).  A pass in
    eval mode stays local: evaluation on one process waits for no other.
    Copies and pickles of the model do not keep the group.

    Parameters
    ----------
    model : torch.nn.Module
        Every :class:`MuMoEGate` inside it is set (:attr:`MuMoEGate.balance_group`).
    process_group : torch.distributed.ProcessGroup, True or None, default True
        The group; ``True`` for the default (WORLD) group; None (or
        ``False``) for this process's batch alone, as without this call.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        If ``process_group`` is not a group, a bool or None.
    RuntimeError
        If a group is asked for and ``torch.distributed`` is not initialised.
    ValueError
        If ``model`` has no :class:`MuMoEGate`.

    Examples
    --------
    On every process, after ``torch.distributed.init_process_group``,
    ``model = DistributedDataParallel(reduce_balance_over(model))``.  With
    None, each gate measures its own batch again:

    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(8, 4, "cp", expert_dims=6, rank=2, balance={"uniform_kl": 1.0})
    >>> reduce_balance_over(layer, None).gate.balance_group is None
    True
    """
    group = check_process_group(process_group)
    for _, gate in _gates(model):
        gate.balance_group = group
    return model


class ExpertMonitor:
    """Each gate's expert usage over the last ``window`` forward passes, with bounded memory.

    Registers a forward hook on every :class:`MuMoEGate` of ``model``; each
    call in training mode (or every call, ``training_only=False``) adds the
    gate's :func:`mumoe.gates.usage` of every level to a ring buffer of
    ``window`` entries, and every ``every``-th adds the mass to a history of at
    most ``history`` rows.  Padding set with :func:`gate_mask` is left out.
    Use it as a context manager, or call :meth:`close`.

    With ``process_group``, each recorded pass measures the batch of every
    process of the group together (its per-expert sums and token counts
    summed over the processes, then normalised): every process sees the same,
    global, metrics.  Every process must then make the same recorded
    passes: the same gates, as many times (training-mode passes by default).

    Parameters
    ----------
    model : torch.nn.Module
    window : int, default 100
        Forward passes the metrics average over; an expert is *dead* when no
        token in the whole window gave it a non-zero coefficient.
    every : int, default 1
        Keep the mass of every ``every``-th pass for :meth:`history`.
    history : int, default 500
        At most this many rows are kept (the oldest are dropped).
    training_only : bool, default True
    process_group : torch.distributed.ProcessGroup, True or None, default None
        Sum the statistics over this group (``True``: the default, WORLD,
        group); None: this process's batches alone.

    Raises
    ------
    ValueError
        If ``window``, ``every`` or ``history`` is not a positive int, or
        ``model`` has no :class:`MuMoEGate`.
    TypeError
        If ``process_group`` is not a group, a bool or None.
    RuntimeError
        If a group is asked for and ``torch.distributed`` is not initialised.

    Examples
    --------
    >>> import torch
    >>> from mumoe.nn import MuMoE
    >>> layer = MuMoE(8, 4, "cp", expert_dims=6, rank=2)
    >>> with ExpertMonitor(layer, window=10) as monitor:
    ...     for _ in range(3):
    ...         _ = layer(torch.randn(16, 8))
    >>> metrics = monitor.metrics()
    >>> round(metrics["gate/0/entropy"], 3), metrics["gate/0/dead"], monitor.steps
    (1.0, 0.0, 3)
    >>> monitor.history("gate").shape  # (passes kept, experts)
    (3, 6)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int = 100,
        every: int = 1,
        history: int = 500,
        training_only: bool = True,
        process_group: dist.ProcessGroup | bool | None = None,
    ) -> None:
        for value, what in ((window, "window"), (every, "every"), (history, "history")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        group = check_process_group(process_group)
        self._reduce = None if group is None else group_sum(group, differentiable=False)
        self.window, self.every, self.training_only = window, every, training_only
        self.steps = 0
        self._owner = threading.get_ident()
        self._recent: dict[str, deque[list[Usage]]] = {}
        self._history: dict[str, deque[list[np.ndarray]]] = {}
        self._handles: list[Any] = []
        self._counts: dict[str, int] = {}
        for name, gate in _gates(model):
            self._recent[name] = deque(maxlen=window)
            self._history[name] = deque(maxlen=history)
            self._handles.append(gate.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(gate: MuMoEGate, _: Any, output: list[torch.Tensor]) -> None:
            if threading.get_ident() != self._owner or (self.training_only and not gate.training):
                return
            mask = gate.mask
            with torch.no_grad(), thread_backend("pytorch"):
                levels = [
                    usage(a.detach().float(), mask, reduce=self._reduce)
                    for a in dense_coefficients(output)
                ]
            # Tensors kept as they are: floats only in metrics(), not a device sync per step.
            recent = self._recent[name]
            if recent and [u.mass.shape for u in recent[-1]] != [u.mass.shape for u in levels]:
                # The gate's experts changed (mumoe.nn.remove_experts_): a new window and
                # history, since the old ones describe other experts.
                recent.clear()
                self._history[name].clear()
            recent.append(levels)
            count = self._counts.get(name, 0)
            if count % self.every == 0:
                self._history[name].append([u.mass.cpu().numpy() for u in levels])
            self._counts[name] = count + 1
            self.steps = max(self.steps, count + 1)

        return hook

    def __enter__(self) -> ExpertMonitor:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (the recorded window and history stay readable).

        Examples
        --------
        >>> import torch
        >>> from mumoe.nn import MuMoE
        >>> monitor = ExpertMonitor(MuMoE(8, 4, "cp", expert_dims=6, rank=2))
        >>> monitor.close()
        >>> monitor.metrics()
        {}
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def metrics(self) -> dict[str, float]:
        """Plain floats over the window, keyed ``"{gate}/{level}/{metric}"``.

        Metrics: ``entropy`` (normalised, 0-1), ``effective_experts``,
        ``mean_support`` and ``max_mass`` (means over the window), and
        ``dead``: experts no token of the window used.

        Returns
        -------
        dict of str to float
            Empty before the first recorded forward pass.

        Examples
        --------
        >>> import torch
        >>> from mumoe.nn import MuMoE
        >>> layer = MuMoE(8, 4, "cp", expert_dims=(3, 2), rank=2)
        >>> with ExpertMonitor(layer) as monitor:
        ...     _ = layer(torch.randn(4, 8))
        >>> sorted(key[7:] for key in monitor.metrics() if key.startswith("gate/1/"))
        ['dead', 'effective_experts', 'entropy', 'max_mass', 'mean_support']
        """
        out: dict[str, float] = {}
        for name, entries in self._recent.items():
            if not entries:
                continue
            for level in range(len(entries[0])):
                rows = [entry[level] for entry in entries]
                prefix = f"{name}/{level}/"
                for key in ("entropy", "effective_experts", "mean_support"):
                    out[prefix + key] = float(torch.stack([getattr(u, key) for u in rows]).mean())
                out[prefix + "max_mass"] = float(torch.stack([u.mass.max() for u in rows]).mean())
                out[prefix + "dead"] = float(len(self.dead_experts(name, level)))
        return out

    def dead_experts(self, gate: str = "gate", level: int = 0) -> list[int]:
        """The experts of ``gate``'s ``level`` that no token of the window used.

        Parameters
        ----------
        gate : str, default "gate"
            The gate's qualified name in the model (``"blocks.3.gate"``).
        level : int, default 0

        Returns
        -------
        list of int

        Examples
        --------
        >>> import torch
        >>> from mumoe.nn import MuMoE
        >>> layer = MuMoE(8, 4, "cp", expert_dims=6, rank=2)
        >>> with ExpertMonitor(layer) as monitor:
        ...     _ = layer(torch.randn(4, 8))
        >>> monitor.dead_experts()  # a zero-initialised gate uses every expert
        []
        """
        entries = self._recent[self._check(gate)]
        if not entries:
            return []
        support = torch.stack([entry[level].support for entry in entries]).sum(0)
        return [int(i) for i in torch.nonzero(support == 0)[:, 0]]

    def history(self, gate: str = "gate", level: int = 0) -> np.ndarray:
        """The kept mass of ``gate``'s ``level``, ``(passes kept, N)``, oldest first.

        Parameters
        ----------
        gate : str, default "gate"
        level : int, default 0

        Returns
        -------
        numpy.ndarray, shape (passes kept, N)
            For :func:`mumoe.plotting.plot_usage`.

        Examples
        --------
        >>> import torch
        >>> from mumoe.nn import MuMoE
        >>> layer = MuMoE(8, 4, "cp", expert_dims=6, rank=2)
        >>> with ExpertMonitor(layer, every=2) as monitor:
        ...     for _ in range(5):
        ...         _ = layer(torch.randn(4, 8))
        >>> monitor.history().shape
        (3, 6)
        """
        rows = self._history[self._check(gate)]
        width = rows[0][level].shape[0] if rows else 0
        return np.stack([row[level] for row in rows]) if rows else np.zeros((0, width))

    def _check(self, gate: str) -> str:
        if gate not in self._recent:
            raise KeyError(f"no gate {gate!r}; the monitored gates are {list(self._recent)}")
        return gate
