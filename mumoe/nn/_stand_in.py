"""What a converted layer shows its parent as ``.weight`` and ``.bias``: a :class:`LinearStandIn`.

A μMoE layer put where an ``nn.Linear`` was (:func:`mumoe.nn.replace_linear`)
holds no dense weight, yet some parents read their linear layer's weight:
transformers' T5 casts its input to ``wo.weight.dtype``, and
``nn.TransformerEncoderLayer`` gathers ``linear1.weight`` to decide whether
its fused fast path may run.  A stand-in answers what such parents ask
(dtype, device, shape) and refuses everything else with a ``RuntimeError``
that names the layer (not a ``TypeError``: torch turns that into
``NotImplemented`` for operators, and the message would be lost): a parent
that computes with the weight itself would skip the experts.  Being a
tensor subclass with ``__torch_function__``, it also turns
``nn.TransformerEncoderLayer``'s fast path off, so the layer runs its
modules and the experts are used.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LinearStandIn", "stand_in"]

#: What a stand-in answers: reading its metadata, never its values.
_METADATA = frozenset(
    {
        *(
            getattr(torch.Tensor, name).__get__
            for name in (
                "dtype",
                "device",
                "shape",
                "ndim",
                "layout",
                "requires_grad",
                "is_meta",
                "is_cuda",
                "is_sparse",
                "is_nested",
                "is_quantized",
            )
        ),
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.element_size,
        torch.Tensor.is_floating_point,
        torch.Tensor.is_complex,
        torch.Tensor.__len__,
    }
)


class LinearStandIn(torch.Tensor):
    """The ``.weight`` (or ``.bias``) of a converted layer: metadata only.

    Its dtype, device and shape are those of the linear layer it replaced
    (``(out_features, in_features)`` for the weight); any computation with it
    raises ``RuntimeError``.
    """

    _layer: str = "a μMoE layer"
    _role: str = "weight"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        stand_in = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, cls))
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        raise RuntimeError(
            f"{stand_in._layer} is a μMoE layer and has no dense {stand_in._role}: {name} was "
            f"called on the stand-in its .{stand_in._role} returns (dtype, device and shape "
            "only); the code that owns the layer computes with its weight instead of calling "
            "it, so it cannot hold a μMoE layer: keep an nn.Linear there"
        )

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        return (
            f"LinearStandIn({self._role} of {self._layer}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"the .{self._role} of {self._layer} is a stand-in; it is not saved")


def stand_in(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, layer: str, role: str
) -> LinearStandIn:
    """A stand-in of ``shape``, ``dtype`` and ``device`` for ``layer``'s ``role``.

    Parameters
    ----------
    shape : tuple of int
    dtype : torch.dtype
    device : torch.device
    layer : str
        How messages name the layer (its qualified name in the model).
    role : {"weight", "bias"}

    Returns
    -------
    LinearStandIn
        One entry of memory, expanded to ``shape``.

    Examples
    --------
    >>> w = stand_in((3, 2), torch.float32, torch.device("cpu"), "'fc'", "weight")
    >>> w.dtype, tuple(w.shape), isinstance(w, torch.Tensor)
    (torch.float32, (3, 2), True)
    >>> w + 1
    Traceback (most recent call last):
    ...
    RuntimeError: 'fc' is a μMoE layer and has no dense weight: ...
    """
    base = torch.empty(1, dtype=dtype, device=device).expand(shape)
    tensor = torch.Tensor._make_subclass(LinearStandIn, base)
    tensor._layer, tensor._role = layer, role
    return tensor
