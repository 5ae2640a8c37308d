r"""The gate: its vocabulary, normalisations, activations, and the health of its experts.

For each expert level, :math:`a^{(e)} = \phi(\mathrm{norm}(x G_e))`
(:func:`gate_coefficients`), with ``norm`` one of :data:`NORMALIZATIONS`
and :math:`\phi` one of :data:`ACTIVATIONS`: entmax-1.5, sparsemax,
softmax, top-k or ReLU-top-k (MxD's, unnormalised), on any TensorLy
backend.  entmax-1.5 and sparsemax are exact: :mod:`mumoe.gates.entmax` on any NumPy-API array,
:mod:`mumoe.gates.entmax_cpu` compiled for the CPU.  :func:`usage` and the
balance losses measure and balance the experts' use.
"""

from mumoe.gates._activations import (
    TOP_K_ACTIVATIONS,
    check_top_k,
    entmax15,
    kth_largest_by_partition,
    kth_largest_by_top_k,
    relu_topk,
    softmax,
    sparsemax,
    topk,
)
from mumoe.gates._balance import (
    JOINT_LIMIT,
    LOSSES,
    Usage,
    balance_loss,
    check_balance,
    importance_cv2,
    joint_usage,
    router_z_loss,
    uniform_kl,
    usage,
)
from mumoe.gates._sparse import (
    SPARSE_ACTIVATIONS,
    relu_topk_support,
    scatter_rows_by_assignment,
    scatter_rows_by_at,
    sparsify,
    top_k_by_lax,
    top_k_by_partition,
    topk_support,
)
from mumoe.gates._statistics import GateStatistics, check_threshold
from mumoe.gates._vocabulary import (
    ACTIVATIONS,
    HIDDEN_ACTIVATIONS,
    NORMALIZATIONS,
    activation_name,
    batch_norm,
    check_hidden_activation,
    check_normalization,
    gate_coefficients,
    gate_dtype,
    gelu,
    gelu_tanh,
    layer_norm,
    relu,
    resolve_activation,
    silu,
)

__all__ = [
    "ACTIVATIONS",
    "HIDDEN_ACTIVATIONS",
    "JOINT_LIMIT",
    "LOSSES",
    "NORMALIZATIONS",
    "SPARSE_ACTIVATIONS",
    "TOP_K_ACTIVATIONS",
    "GateStatistics",
    "Usage",
    "activation_name",
    "balance_loss",
    "batch_norm",
    "check_balance",
    "check_hidden_activation",
    "check_normalization",
    "check_threshold",
    "check_top_k",
    "entmax15",
    "gate_coefficients",
    "gate_dtype",
    "gelu",
    "gelu_tanh",
    "importance_cv2",
    "joint_usage",
    "kth_largest_by_partition",
    "kth_largest_by_top_k",
    "layer_norm",
    "relu",
    "relu_topk",
    "relu_topk_support",
    "resolve_activation",
    "router_z_loss",
    "scatter_rows_by_assignment",
    "scatter_rows_by_at",
    "silu",
    "softmax",
    "sparsemax",
    "sparsify",
    "top_k_by_lax",
    "top_k_by_partition",
    "topk",
    "topk_support",
    "uniform_kl",
    "usage",
]
