"""Serving without PyTorch: eval-mode layers on any backend, and the portable weights file.

:func:`load` reads a weights file (written by :func:`mumoe.nn.save`) as an
:class:`InferenceMuMoE` or :class:`InferenceMuMoEBlock` on the active
TensorLy backend (NumPy, CuPy, JAX, PyTorch), which computes what the torch
module computes in ``eval()`` mode.  :func:`write` and :func:`read_checked`
are the file format's one writer and one reader.
"""

from mumoe.inference._files import write_atomically
from mumoe.inference._layers import InferenceLinear, InferenceMuMoE, InferenceMuMoEBlock
from mumoe.inference._weights_file import (
    BLOCK_FORMS,
    FORMAT,
    MAX_DESCRIPTION,
    MAX_HEADER,
    MAX_SPEC_LENGTH,
    VERSION,
    block_forms,
    block_parts,
    check_values_fit,
    load,
    network_meta,
    read_checked,
    write,
)

__all__ = [
    "BLOCK_FORMS",
    "FORMAT",
    "MAX_DESCRIPTION",
    "MAX_HEADER",
    "MAX_SPEC_LENGTH",
    "VERSION",
    "InferenceLinear",
    "InferenceMuMoE",
    "InferenceMuMoEBlock",
    "block_forms",
    "block_parts",
    "check_values_fit",
    "load",
    "network_meta",
    "read_checked",
    "write",
    "write_atomically",
]
