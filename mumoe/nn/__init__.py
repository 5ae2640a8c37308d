"""PyTorch modules: μMoE layers, the two-layer block, gating and initialisation.

The one place in mumoe that imports torch (with :mod:`mumoe.compat`):
``import mumoe`` works without it.
"""

from mumoe.nn.factorized import FactorizedMuMoE, network_of, to_factorized_tensor
from mumoe.nn.gating import (
    ACTIVATIONS,
    MuMoEGate,
    gate_coefficients,
    gate_dtype,
    resolve_activation,
)
from mumoe.nn.init import init_cores_
from mumoe.nn.layers import (
    CPMuMoE,
    GateRecord,
    MuMoE,
    MuMoEBlock,
    TRMuMoE,
    TTMuMoE,
    TuckerMuMoE,
    build_network,
    record_gates,
    torch_forward,
)

__all__ = [
    "ACTIVATIONS",
    "CPMuMoE",
    "FactorizedMuMoE",
    "GateRecord",
    "MuMoE",
    "MuMoEBlock",
    "MuMoEGate",
    "TRMuMoE",
    "TTMuMoE",
    "TuckerMuMoE",
    "build_network",
    "gate_coefficients",
    "gate_dtype",
    "init_cores_",
    "network_of",
    "record_gates",
    "resolve_activation",
    "to_factorized_tensor",
    "torch_forward",
]
