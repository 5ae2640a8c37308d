"""PyTorch modules: μMoE layers, the two-layer block, gating, initialisation and I/O.

The modules hold parameters and state and call the backend-agnostic layer
recipe (:mod:`mumoe.recipe`).  This package, :mod:`mumoe.compat` and
:mod:`mumoe.demo` are the only places in mumoe that import torch:
``import mumoe`` works without it.
"""

from mumoe.build import build_network
from mumoe.nn.analysis import GateRecord, record_gates
from mumoe.nn.block import MuMoEBlock
from mumoe.nn.contract import torch_forward
from mumoe.nn.convert import from_linear, replace_linear
from mumoe.nn.factorized import FactorizedMuMoE, network_of, to_factorized_tensor
from mumoe.nn.gating import (
    TORCH_KERNELS,
    MuMoEGate,
    gate_dtype,
    resolve_activation,
    torch_gate_coefficients,
)
from mumoe.nn.health import ExpertMonitor, collect_aux_losses, gate_mask
from mumoe.nn.init import init_cores_
from mumoe.nn.layers import (
    CPMuMoE,
    MuMoE,
    TRMuMoE,
    TTMuMoE,
    TuckerMuMoE,
)

__all__ = [
    "TORCH_KERNELS",
    "CPMuMoE",
    "ExpertMonitor",
    "FactorizedMuMoE",
    "GateRecord",
    "MuMoE",
    "MuMoEBlock",
    "MuMoEGate",
    "TRMuMoE",
    "TTMuMoE",
    "TuckerMuMoE",
    "build_network",
    "collect_aux_losses",
    "from_linear",
    "gate_dtype",
    "gate_mask",
    "init_cores_",
    "network_of",
    "record_gates",
    "replace_linear",
    "resolve_activation",
    "to_factorized_tensor",
    "torch_forward",
    "torch_gate_coefficients",
]
