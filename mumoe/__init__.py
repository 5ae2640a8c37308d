r"""mumoe: Multilinear Mixture-of-Experts layers as factorised tensor networks.

The data flow, one module per step::

    spec  ->  Network  ->  Plan (cached)  ->  contraction on the active backend
    mumoe.spec  mumoe.network  mumoe.plan     mumoe.functional

Presets (:mod:`mumoe.presets`) build the networks of the standard
factorisations; the functional core runs on any TensorLy backend chosen with
``tl.set_backend``.

Examples
--------
>>> import mumoe
>>> net = mumoe.cp(128, 768, 1000, rank=64)
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
from mumoe.network import Network
from mumoe.plan import Plan, PlanCache
from mumoe.presets import (
    PRESETS,
    cp,
    dense,
    preset,
    tr,
    tt,
    tucker,
    validate_cp_rank,
    validate_tr_rank,
    validate_tt_rank,
    validate_tucker_rank,
)
from mumoe.spec import parse_spec

__version__ = "0.1.0.dev0"

__all__ = [
    "PRESETS",
    "ExpertWeight",
    "Network",
    "Plan",
    "PlanCache",
    "__version__",
    "cp",
    "dense",
    "expert_weight",
    "forward",
    "materialize",
    "parse_spec",
    "preset",
    "random_cores",
    "scale_experts",
    "tr",
    "tt",
    "tucker",
    "validate_cp_rank",
    "validate_tr_rank",
    "validate_tt_rank",
    "validate_tucker_rank",
]
