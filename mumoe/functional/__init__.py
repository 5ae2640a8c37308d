"""Arrays in, arrays out, on any TensorLy backend: the forward pass and the layer recipe.

:func:`forward` contracts gates, input and cores along a cached plan
(Eq. 1 of the paper, ``W`` never formed); :func:`materialize`,
:func:`expert_weight` and :func:`scale_experts` are the dense and per-expert
views; :func:`layer_forward` and :func:`block_forward` are the layer recipe
every layer runs; :func:`cores_from_dense` starts a network's cores at a
dense layer; :func:`matrix_form` and :func:`tensor_form` convert ``W``
between its matrix form and the legs of a network that splits its input or
output (:func:`input_operand` is such an input).  A level may come as its
support (:class:`~mumoe.typing.SparseGate`): :func:`gather_sum` then gathers
the rows of the core it needs instead of multiplying zeros, and
:func:`densify` gives the dense coefficients back.
"""

from mumoe.functional._checks import check_cores, check_level
from mumoe.functional._forward import (
    ExpertWeight,
    check_support_indices,
    contract,
    expert_weight,
    forward,
    materialize,
    random_cores,
    scale_experts,
)
from mumoe.functional._from_dense import STARTS, cores_from_dense, dense_matrix, relative_error
from mumoe.functional._from_layers import (
    FITS,
    cores_from_experts,
    expert_errors,
    expert_tensor,
    revive_bonds,
)
from mumoe.functional._layer import Contract, block_forward, layer_forward, scale_gates
from mumoe.functional._legs import input_operand, matrix_form, run_plan, tensor_form
from mumoe.functional._sparse import (
    contract_sparse,
    dense_gates,
    densify,
    gather_core,
    gather_sum,
    gather_sum_by_csr,
)

__all__ = [
    "FITS",
    "STARTS",
    "Contract",
    "ExpertWeight",
    "block_forward",
    "check_cores",
    "check_level",
    "check_support_indices",
    "contract",
    "contract_sparse",
    "cores_from_dense",
    "cores_from_experts",
    "dense_gates",
    "dense_matrix",
    "densify",
    "expert_errors",
    "expert_tensor",
    "expert_weight",
    "forward",
    "gather_core",
    "gather_sum",
    "gather_sum_by_csr",
    "input_operand",
    "layer_forward",
    "materialize",
    "matrix_form",
    "random_cores",
    "relative_error",
    "revive_bonds",
    "run_plan",
    "scale_experts",
    "scale_gates",
    "tensor_form",
]
