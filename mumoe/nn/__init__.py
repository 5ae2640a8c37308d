"""PyTorch modules: μMoE layers, the two-layer block and its gate, conversion, I/O and analysis.

The modules own parameters and state (cores, gate projections, batch-norm
statistics) and call the backend-agnostic layer recipe
(:func:`mumoe.functional.layer_forward`); the torch kernels here (exact
entmax-1.5 and sparsemax with closed-form gradients, the bias kernel) are
the ``pytorch`` backend's, declared in ``mumoe/backends/pytorch.toml``.
This package (with :mod:`mumoe.nn.compat`, the reference implementation's
API) and :mod:`mumoe.demo` are the only places that import torch.
"""

from mumoe.nn._analysis import (
    GateRecord,
    collect_gates,
    counterfactual_histogram,
    edit_experts,
    edit_experts_,
    gate_statistics,
    record_gates,
)
from mumoe.nn._block import TORCH_HIDDEN_ACTIVATIONS, MuMoEBlock
from mumoe.nn._bonds import (
    BondRegularizer,
    PruneReport,
    component_norms,
    prune_bonds,
    regularize_bonds,
)
from mumoe.nn._bridge import torch_forward
from mumoe.nn._convert import block_from_mlp, from_linear, linear_weights, replace_linear
from mumoe.nn._distill import ActivationPairs, DistillHistory, distill, fit_metrics
from mumoe.nn._entmax import entmax15, sparsemax
from mumoe.nn._factorized import FactorizedMuMoE, network_of, to_factorized_tensor
from mumoe.nn._from_linears import from_linears
from mumoe.nn._frontier import Transcoder, frontier, transcoder_width
from mumoe.nn._gate import (
    TORCH_KERNELS,
    MuMoEGate,
    dense_coefficients,
    resolve_activation,
    torch_gate_coefficients,
)
from mumoe.nn._init import apply_init_, init_cores_
from mumoe.nn._io import load_into, save
from mumoe.nn._kernels import bias_matmul, gather_sum_by_embedding_bag, kth_largest, scatter_rows
from mumoe.nn._layers import MuMoE
from mumoe.nn._mlp import FoldedIntoBlock, MLPParts, find_mlps, hidden_activation_of, replace_mlp
from mumoe.nn._model_io import load_model, module_from_config, save_model
from mumoe.nn._monitor import ExpertMonitor, collect_aux_losses, gate_mask, reduce_balance_over
from mumoe.nn._preset_layers import CPMuMoE, TRMuMoE, TTMatrixMuMoE, TTMuMoE, TuckerMuMoE
from mumoe.nn._splice import SpliceReport, ZeroOutput, splice_report, spliced
from mumoe.nn._steer import steer_experts
from mumoe.nn._surgery import (
    MergedGroup,
    MergeReport,
    expert_linear,
    merge_experts_,
    mixture_linear,
    remove_experts_,
)

__all__ = [
    "TORCH_HIDDEN_ACTIVATIONS",
    "TORCH_KERNELS",
    "ActivationPairs",
    "BondRegularizer",
    "CPMuMoE",
    "DistillHistory",
    "ExpertMonitor",
    "FactorizedMuMoE",
    "FoldedIntoBlock",
    "GateRecord",
    "MLPParts",
    "MergeReport",
    "MergedGroup",
    "MuMoE",
    "MuMoEBlock",
    "MuMoEGate",
    "PruneReport",
    "SpliceReport",
    "TRMuMoE",
    "TTMatrixMuMoE",
    "TTMuMoE",
    "Transcoder",
    "TuckerMuMoE",
    "ZeroOutput",
    "apply_init_",
    "bias_matmul",
    "block_from_mlp",
    "collect_aux_losses",
    "collect_gates",
    "component_norms",
    "counterfactual_histogram",
    "dense_coefficients",
    "distill",
    "edit_experts",
    "edit_experts_",
    "entmax15",
    "expert_linear",
    "find_mlps",
    "fit_metrics",
    "from_linear",
    "from_linears",
    "frontier",
    "gate_mask",
    "gate_statistics",
    "gather_sum_by_embedding_bag",
    "hidden_activation_of",
    "init_cores_",
    "kth_largest",
    "linear_weights",
    "load_into",
    "load_model",
    "merge_experts_",
    "mixture_linear",
    "module_from_config",
    "network_of",
    "prune_bonds",
    "record_gates",
    "reduce_balance_over",
    "regularize_bonds",
    "remove_experts_",
    "replace_linear",
    "replace_mlp",
    "resolve_activation",
    "save",
    "save_model",
    "scatter_rows",
    "sparsemax",
    "splice_report",
    "spliced",
    "steer_experts",
    "to_factorized_tensor",
    "torch_forward",
    "torch_gate_coefficients",
    "transcoder_width",
]
