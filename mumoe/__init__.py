r"""mumoe: Multilinear Mixture-of-Experts layers as factorised tensor networks.

The data flow, one subpackage per layer::

    spec       ->  plan             ->  functional          ->  inference, nn
    Network        Planner, Plan        forward, the recipe     eval layers; torch modules
                                         gates (beside): the gate's activations and health

This face holds the names most code needs: the presets and
:class:`Network`, the functional forward pass and its dense views, and a
network's planner, FLOPs and description.  The
functional core runs on any TensorLy backend chosen with
``tl.set_backend``.  See the Architecture page of the docs.

Examples
--------
>>> import mumoe
>>> net = mumoe.cp(768, 1000, expert_dims=128, rank=64)
>>> net.n_params
121408
"""

from mumoe.functional import (
    ExpertWeight,
    expert_weight,
    forward,
    materialize,
    random_cores,
    scale_experts,
)
from mumoe.plan import Plan, PlanCache, describe, flops, planner_of
from mumoe.spec import (
    FORMATS,
    PRESETS,
    Budget,
    Format,
    Network,
    balanced_shape,
    build_network,
    cp,
    dense,
    lowrank,
    mxd,
    parse_spec,
    preset,
    tr,
    tt,
    ttm,
    tucker,
    validate_cp_rank,
    validate_tr_rank,
    validate_tt_rank,
    validate_tucker_rank,
)
from mumoe.typing import SparseGate

__version__ = "0.1.0.dev0"

__all__ = [
    "FORMATS",
    "PRESETS",
    "Budget",
    "ExpertWeight",
    "Format",
    "Network",
    "Plan",
    "PlanCache",
    "SparseGate",
    "__version__",
    "balanced_shape",
    "build_network",
    "cp",
    "dense",
    "describe",
    "expert_weight",
    "flops",
    "forward",
    "lowrank",
    "materialize",
    "mxd",
    "parse_spec",
    "planner_of",
    "preset",
    "random_cores",
    "scale_experts",
    "tr",
    "tt",
    "ttm",
    "tucker",
    "validate_cp_rank",
    "validate_tr_rank",
    "validate_tt_rank",
    "validate_tucker_rank",
]
