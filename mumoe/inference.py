r"""Serving μMoE layers on any backend, and portable weight files.

:func:`save` writes a trained :class:`mumoe.nn.MuMoE` or
:class:`mumoe.nn.MuMoEBlock` (cores, gate projections, batch-norm running
statistics, input layer norm, network specs and gating configuration) to a
safetensors file (checked in full before any tensor is read); :func:`load`
reads it back as an :class:`InferenceMuMoE` or
:class:`InferenceMuMoEBlock` on the active TensorLy backend (NumPy, CuPy,
JAX, PyTorch), which computes it in eval mode with no PyTorch needed, and
:func:`load_into` reads it into an existing torch module, all or nothing.

This module gathers the names users import; the code lives where its
concern does: the file format in :mod:`mumoe.fileformat`, the serving
layers in :mod:`mumoe.serving`, and the torch side (:func:`save`,
:func:`load_into`, imported on first use) in :mod:`mumoe.nn.io`.
"""

from typing import TYPE_CHECKING

from mumoe._deprecation import module_getattr
from mumoe.fileformat import FORMAT, VERSION, load
from mumoe.serving import InferenceMuMoE, InferenceMuMoEBlock

if TYPE_CHECKING:
    from mumoe.nn.io import load_into, save

__all__ = [
    "FORMAT",
    "VERSION",
    "InferenceMuMoE",
    "InferenceMuMoEBlock",
    "load",
    "load_into",
    "save",
]

# save and load_into take torch modules: they import torch, and only when used.
__getattr__ = module_getattr(__name__, {}, lazy={"save": "mumoe.nn.io", "load_into": "mumoe.nn.io"})
