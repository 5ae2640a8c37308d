"""Splice-in evaluation: a model's loss with replacements swapped in, against the original.

:func:`spliced` swaps modules into a model for a ``with`` block and puts the
originals back; :func:`splice_report` runs the model three times over the
same data (as it is, with the replacements, with the replaced modules' output
zeroed) and reports the loss change, the fraction of the zero-ablation loss
the replacements recover, and their sparsity (L0: experts a token uses).
For a language model the loss is the next-token cross-entropy over the
tokens the attention mask keeps (ΔCE); for a classifier, the cross-entropy
and the accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mumoe.nn._batches import call, inputs_dropped, logits_of
from mumoe.nn._convert import _parent
from mumoe.nn._gate import MuMoEGate, dense_coefficients
from mumoe.nn._monitor import gate_mask

__all__ = ["SpliceReport", "ZeroOutput", "splice_report", "spliced"]


class ZeroOutput(nn.Module):
    """A module whose output is zeros of ``out_features``: the zero ablation of a layer.

    Parameters
    ----------
    out_features : int

    Examples
    --------
    >>> ZeroOutput(3)(torch.ones(2, 5)).shape
    torch.Size([2, 3])
    """

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Zeros of shape ``(..., out_features)``, of ``x``'s dtype and device.

        Parameters
        ----------
        x : torch.Tensor, shape (..., I)
        *args, **kwargs
            Ignored: whatever else the replaced module took.

        Returns
        -------
        torch.Tensor, shape (..., out_features)

        Examples
        --------
        >>> ZeroOutput(2)(torch.ones(3, 4), "ignored").sum()
        tensor(0.)
        """
        return x.new_zeros(*x.shape[:-1], self.out_features)


@contextmanager
def spliced(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Swap modules into ``model`` by qualified name for a ``with`` block, then put them back.

    Parameters
    ----------
    model : torch.nn.Module
    replacements : mapping of str to torch.nn.Module
        ``{qualified name: module}``; every name must exist.

    Yields
    ------
    torch.nn.Module
        ``model``, with the replacements in.

    Raises
    ------
    AttributeError
        If a name is not a submodule (nothing is swapped then).

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> with spliced(model, {"0": nn.Identity()}):
    ...     type(model[0]).__name__
    'Identity'
    >>> type(model[0]).__name__
    'Linear'
    """
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            parent, child = _parent(model, name)
            setattr(parent, child, module)
        yield model
    finally:
        for name, module in originals.items():
            parent, child = _parent(model, name)
            setattr(parent, child, module)


@dataclass(frozen=True)
class SpliceReport:
    """What a model's loss does with replacements spliced in (:func:`splice_report`).

    Parameters
    ----------
    loss, loss_spliced, loss_zero : float
        The mean loss per token (per example for a classifier) of the model,
        with the replacements, and with the replaced modules' output zeroed.
    delta : float
        ``loss_spliced - loss`` (ΔCE for a language model).
    recovered : float
        ``(loss_zero - loss_spliced) / (loss_zero - loss)``: 1 when the
        replacements lose nothing, 0 when they are as bad as zeros.
    l0 : float
        Experts a token uses in the replacements' gates (non-zero
        coefficients, multiplied over the levels, averaged over the gates);
        NaN without gates.
    tokens : int
        Tokens (or examples) the means are over.
    accuracy, accuracy_spliced, accuracy_zero : float or None
        For a classifier.

    Examples
    --------
    >>> report = SpliceReport(loss=2.0, loss_spliced=2.1, loss_zero=3.0, delta=0.1,
    ...                       recovered=0.9, l0=8.0, tokens=100)
    >>> report.delta, report.accuracy
    (0.1, None)
    """

    loss: float
    loss_spliced: float
    loss_zero: float
    delta: float
    recovered: float
    l0: float
    tokens: int
    accuracy: float | None = None
    accuracy_spliced: float | None = None
    accuracy_zero: float | None = None


def _wide(logits: torch.Tensor) -> torch.Tensor:
    # The loss in float32 at least (16-bit logits lose the cross-entropy's digits).
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _lm_loss(
    model: nn.Module, batch: Any, mask_key: str
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("a language model's batches are mappings holding 'input_ids'")
    logits = logits_of(call(model, batch, inputs_dropped(None)))[:, :-1]
    targets = batch["input_ids"][:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool)
    mask = batch.get(mask_key)
    if mask is not None:
        keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    losses = nn.functional.cross_entropy(
        _wide(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    kept = keep.reshape(-1)
    return losses[kept].sum(), int(kept.sum()), None


def _classifier_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, torch.Tensor]:
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        labels = batch[1]
    else:
        labels = None
    if labels is None:
        raise ValueError("a classifier's batches hold labels: (inputs, labels) or a 'labels' key")
    logits = logits_of(call(model, batch, inputs_dropped(None)))
    loss = nn.functional.cross_entropy(_wide(logits), labels, reduction="sum")
    return loss, int(labels.shape[0]), (logits.argmax(-1) == labels).sum()


def _run(
    model: nn.Module, data: Iterable[Any], task: str, mask_key: str
) -> tuple[float, int, float | None]:
    total, count, correct = 0.0, 0, 0
    batches = 0
    gated = any(isinstance(m, MuMoEGate) for m in model.modules())
    with torch.no_grad():
        for batch in data:
            batches += 1
            mask = batch.get(mask_key) if isinstance(batch, Mapping) else None
            # The gates learn which rows are padding (left out of their L0).
            masking = gate_mask(model, mask) if gated and mask is not None else nullcontext()
            with masking:
                if task == "lm":
                    loss, n, hits = _lm_loss(model, batch, mask_key)
                else:
                    loss, n, hits = _classifier_loss(model, batch)
            total += float(loss)
            count += n
            correct += 0 if hits is None else int(hits)
    if not batches:
        raise ValueError("data yielded no batches")
    if not count:
        raise ValueError(f"every token of data was masked out by {mask_key!r}")
    return total / count, count, (correct / count if task == "classification" else None)


def splice_report(
    model: nn.Module,
    data: Iterable[Any],
    replacements: Mapping[str, nn.Module],
    *,
    task: str = "lm",
    zero: Mapping[str, nn.Module] | None = None,
    mask_key: str = "attention_mask",
) -> SpliceReport:
    """The model's loss with ``replacements`` spliced in, against the original and zeros.

    The model runs in eval mode, without gradients, three times over
    ``data`` (so ``data`` must be re-iterable: a list or a DataLoader).

    Parameters
    ----------
    model : torch.nn.Module
    data : iterable
        Batches.  ``task="lm"``: mappings with ``input_ids`` (and the
        padding mask under ``mask_key``); the loss is the next-token
        cross-entropy of the tokens the mask keeps.  ``"classification"``:
        ``(inputs, labels)`` or mappings with ``labels``.
    replacements : mapping of str to torch.nn.Module
        As :func:`spliced` takes them (a split MLP: its ``intermediate`` to the
        block and its ``output.dense`` to ``nn.Identity()``).
    task : {"lm", "classification"}, default "lm"
    zero : mapping of str to torch.nn.Module, optional
        The zero ablation; by default each replacement with ``out_features``
        becomes a :class:`ZeroOutput` of that size (others are kept).
    mask_key : str, default "attention_mask"

    Returns
    -------
    SpliceReport

    Raises
    ------
    ValueError
        For an unknown task, data without batches or tokens, or batches
        that do not hold what the task needs.

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> report = splice_report(model, data, {"2": model[2]}, task="classification")
    >>> report.delta, report.recovered, report.tokens
    (0.0, 1.0, 16)
    """
    if task not in ("lm", "classification"):
        raise ValueError(f"unknown task {task!r}; choose 'lm' or 'classification'")
    if zero is None:
        zero = {}
        for name, module in replacements.items():
            out = getattr(module, "out_features", None)
            zero[name] = ZeroOutput(out) if isinstance(out, int) else module
    training = model.training
    model.eval()
    try:
        loss, tokens, accuracy = _run(model, data, task, mask_key)
        gates = [m for r in replacements.values() for m in r.modules() if isinstance(m, MuMoEGate)]
        recorded: list[tuple[list[torch.Tensor], torch.Tensor | None]] = []
        handles = [
            g.register_forward_hook(
                lambda gate, _, out: recorded.append((dense_coefficients(out), gate.mask))
            )
            for g in gates
        ]
        try:
            with spliced(model, replacements):
                for module in replacements.values():
                    module.eval()
                spliced_loss, _, spliced_accuracy = _run(model, data, task, mask_key)
        finally:
            for handle in handles:
                handle.remove()
        with spliced(model, zero):
            zero_loss, _, zero_accuracy = _run(model, data, task, mask_key)
    finally:
        model.train(training)
    gap = zero_loss - loss
    return SpliceReport(
        loss=loss,
        loss_spliced=spliced_loss,
        loss_zero=zero_loss,
        delta=spliced_loss - loss,
        recovered=(zero_loss - spliced_loss) / gap if gap else float("nan"),
        l0=_l0(recorded),
        tokens=tokens,
        accuracy=accuracy,
        accuracy_spliced=spliced_accuracy,
        accuracy_zero=zero_accuracy,
    )


def _l0(recorded: list[tuple[list[torch.Tensor], torch.Tensor | None]]) -> float:
    # Mean over every gate call's tokens of the experts used, the levels multiplied.
    total, count = 0.0, 0
    for levels, mask in recorded:
        active = None
        for a in levels:
            used = (a.detach().reshape(-1, a.shape[-1]) != 0).sum(-1).double()
            active = used if active is None else active * used
        if active is not None and mask is not None:
            active = active[mask.reshape(-1).to(active.device) != 0]
        if active is not None:
            total += float(active.sum())
            count += active.numel()
    return total / count if count else float("nan")
