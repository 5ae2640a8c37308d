"""Data for the analysis helpers: tensors, dict batches and DataLoaders, one batch at a time.

A data set is a tensor or a mapping of tensors (sliced along the first
dimension), or any iterable of batches (a ``DataLoader``, a list, a
generator): a tensor, a tuple or list whose first item is the model's input
(``(inputs, labels)``), or a mapping of the model's keyword arguments
(``input_ids``, ``attention_mask``, ...).  Labels, padding masks and token ids
are named by a mapping key or a tuple position, or given beside the data.
A mapping's labels are not the model's arguments: the key ``"labels"`` and the
key named by ``labels=`` are left out of the call (:func:`inputs_dropped`),
unless the helper reads that key as an input too (``"input_ids"`` as tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mumoe.validation import host_array, positive_int

__all__ = [
    "Field",
    "LabelSource",
    "batches",
    "call",
    "field",
    "inputs_dropped",
    "logits_of",
    "samples_of",
]

#: A batch's item: a mapping key or a tuple position.
Field = str | int


def batches(data: Any, batch_size: int) -> Iterator[Any]:
    """The batches of ``data``: a tensor or mapping of tensors sliced, any other iterable as it is.

    Parameters
    ----------
    data : torch.Tensor, mapping of tensors, or iterable of batches
    batch_size : int
        Rows per slice of a tensor or mapping.

    Yields
    ------
    batch

    Raises
    ------
    TypeError
        For data that is none of these (a string, a number).

    Examples
    --------
    >>> import torch
    >>> [b.shape[0] for b in batches(torch.zeros(5, 2), 2)]
    [2, 2, 1]
    >>> [b["input_ids"].shape for b in batches({"input_ids": torch.zeros(3, 4)}, 2)]
    [torch.Size([2, 4]), torch.Size([1, 4])]
    """
    batch_size = positive_int(batch_size, "batch_size")
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise TypeError("data must be batched along its first dimension, got a 0-d tensor")
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
    elif isinstance(data, Mapping):
        sizes = {key: value.shape[0] for key, value in data.items() if hasattr(value, "shape")}
        if not sizes or len(set(sizes.values())) > 1:
            raise ValueError(
                f"a mapping of data holds tensors of one first dimension, got sizes {sizes}"
            )
        for start in range(0, next(iter(sizes.values())), batch_size):
            yield {
                key: value[start : start + batch_size] if key in sizes else value
                for key, value in data.items()
            }
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes):
        yield from data
    else:
        raise TypeError(
            "data must be a tensor, a mapping of tensors, or an iterable of batches (a "
            f"DataLoader), got {type(data).__qualname__}"
        )


def inputs_dropped(labels: Any, *inputs: Field | None) -> set[str]:
    """The keys of a mapping batch that are not the model's: ``"labels"`` and ``labels``.

    Parameters
    ----------
    labels : Any
        The helper's ``labels`` argument (a key when a string).
    *inputs : str, int or None
        Keys the helper reads that are the model's inputs too (tokens, mask):
        never dropped.

    Returns
    -------
    set of str

    Examples
    --------
    >>> sorted(inputs_dropped("label")), sorted(inputs_dropped("input_ids", "input_ids"))
    (['label', 'labels'], ['labels'])
    """
    dropped = {"labels"} | ({labels} if isinstance(labels, str) else set())
    return dropped - set(inputs)


def samples_of(batch: Any) -> int:
    """The number of samples in a batch: its (first) tensor's first dimension.

    Parameters
    ----------
    batch : tensor, tuple or list, or mapping

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If the batch holds no tensor to count.

    Examples
    --------
    >>> import torch
    >>> samples_of({"input_ids": torch.zeros(3, 7)}), samples_of((torch.zeros(5, 2), None))
    (3, 5)
    """
    items = (
        batch.values()
        if isinstance(batch, Mapping)
        else (batch if isinstance(batch, tuple | list) else (batch,))
    )
    for item in items:
        shape = getattr(item, "shape", None)
        if shape is not None and len(shape):
            return int(shape[0])
    raise ValueError(
        f"the batch holds no tensor whose first dimension counts its samples: {batch!r}"
    )


def call(model: nn.Module, batch: Any, drop: Iterable[str] = ()) -> Any:
    """Run ``model`` on one batch: a mapping as keywords (less ``drop``), a tuple's first item.

    Parameters
    ----------
    model : torch.nn.Module
    batch : tensor, tuple or list, or mapping
    drop : iterable of str
        Keys that are not the model's arguments (labels).

    Returns
    -------
    Any
        The model's output.

    Examples
    --------
    >>> import torch
    >>> call(torch.nn.Linear(2, 1), (torch.zeros(3, 2), torch.zeros(3))).shape
    torch.Size([3, 1])
    """
    if isinstance(batch, Mapping):
        dropped = set(drop)
        return model(**{key: value for key, value in batch.items() if key not in dropped})
    if isinstance(batch, tuple | list):
        return model(batch[0])
    return model(batch)


def logits_of(output: Any) -> torch.Tensor:
    """A model's class scores: ``output.logits`` (``transformers``), a tuple's first, or itself.

    Parameters
    ----------
    output : Any
        What the model returned.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import torch
    >>> logits_of((torch.zeros(2, 3), None)).shape
    torch.Size([2, 3])
    """
    logits = getattr(output, "logits", output)
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits


def field(batch: Any, key: Field, what: str) -> Any:
    """The item ``key`` of a batch (a tensor batch is the tuple ``(batch,)``).

    Parameters
    ----------
    batch : tensor, tuple or list, or mapping
    key : str or int
        A mapping key or a tuple position.
    what : str
        Named in messages (``"labels"``).

    Returns
    -------
    Any

    Raises
    ------
    ValueError
        If the batch has no such item; the message lists what it has.

    Examples
    --------
    >>> field({"input_ids": 1, "labels": 2}, "labels", "labels")
    2
    >>> field({"input_ids": 1}, "labels", "labels")
    Traceback (most recent call last):
    ...
    ValueError: labels='labels' is not in the batch, which holds ['input_ids']
    """
    items = batch if isinstance(batch, tuple | list | Mapping) else (batch,)
    if isinstance(items, Mapping):
        if isinstance(key, str) and key in items:
            return items[key]
        raise ValueError(f"{what}={key!r} is not in the batch, which holds {list(items)}")
    if isinstance(key, int) and not isinstance(key, bool) and -len(items) <= key < len(items):
        return items[key]
    raise ValueError(
        f"{what}={key!r} is not a position of the batch, a {type(batch).__name__} of "
        f"{len(items)} item(s)"
    )


class LabelSource:
    """Each batch's labels: a batch item (key or position), or an array or iterable beside the data.

    Parameters
    ----------
    labels : str, int, array of int (S,), or iterable of per-batch arrays
        A str or int names a batch item; an array is consumed a batch's
        samples at a time; any other iterable yields one array per batch.

    Examples
    --------
    >>> import numpy as np
    >>> source = LabelSource(np.arange(5))
    >>> source.next(None, 2), source.next(None, 3)
    (array([0, 1]), array([2, 3, 4]))
    >>> source.finish()
    """

    def __init__(self, labels: Any) -> None:
        self.key: Field | None = None
        self.array: np.ndarray | None = None
        self.iterator: Iterator[Any] | None = None
        self.taken = 0
        if isinstance(labels, str | int) and not isinstance(labels, bool):
            self.key = labels
        elif hasattr(labels, "shape") or isinstance(labels, list | tuple):
            self.array = host_array(labels)
            if self.array.ndim != 1:
                raise ValueError(
                    f"labels beside the data are one per sample, shape (S,); got "
                    f"{self.array.shape} (give per-token labels in the batches)"
                )
        elif isinstance(labels, Iterable):
            self.iterator = iter(labels)
        else:
            raise TypeError(
                "labels must be a batch key (str), a batch position (int), an array of one "
                f"label per sample, or an iterable of per-batch arrays; got {labels!r}"
            )

    def next(self, batch: Any, samples: int) -> np.ndarray:
        """The labels of the next batch, of ``samples`` samples.

        Parameters
        ----------
        batch : Any
            The batch (for a key or position).
        samples : int
            Its first dimension.

        Returns
        -------
        numpy.ndarray

        Raises
        ------
        ValueError
            If the labels run out before the data.

        Examples
        --------
        >>> LabelSource("y").next({"y": [1, 2]}, 2)
        array([1, 2])
        """
        if self.key is not None:
            return host_array(field(batch, self.key, "labels"))
        if self.array is not None:
            if self.taken + samples > self.array.shape[0]:
                raise ValueError(
                    f"labels has {self.array.shape[0]} entries, fewer than the data's samples "
                    f"(at least {self.taken + samples})"
                )
            chunk = self.array[self.taken : self.taken + samples]
            self.taken += samples
            return chunk
        assert self.iterator is not None
        try:
            return host_array(next(self.iterator))
        except StopIteration:
            raise ValueError("labels ran out of batches before the data") from None

    def finish(self) -> None:
        """Check that labels beside the data were used up exactly.

        Raises
        ------
        ValueError
            If labels are left over: they do not belong to this data.

        Examples
        --------
        >>> import numpy as np
        >>> source = LabelSource(np.arange(3))
        >>> _ = source.next(None, 2)
        >>> source.finish()
        Traceback (most recent call last):
        ...
        ValueError: labels has 3 entries, but the data has 2 samples
        """
        if self.array is not None and self.taken != self.array.shape[0]:
            raise ValueError(
                f"labels has {self.array.shape[0]} entries, but the data has {self.taken} samples"
            )
        if self.iterator is not None and next(self.iterator, None) is not None:
            raise ValueError("labels hold more batches than the data")
