r"""mumoe: Multilinear Mixture-of-Experts layers as factorised tensor networks.

The data flow, one module per step::

    spec  ->  Network  ->  Plan (cached)  ->  contraction  ->  layer recipe  ->  layers
    mumoe.spec  mumoe.network  mumoe.planner  mumoe.functional  mumoe.recipe   mumoe.nn,
                               mumoe.plan                                      mumoe.serving

The formats (cp, tucker, tt, tr, dense) are records of
:data:`mumoe.formats.FORMATS`, built by the presets of :mod:`mumoe.presets`;
the functional core runs on any TensorLy backend chosen with
``tl.set_backend``.  See the Architecture page of the docs.

Examples
--------
>>> import mumoe
>>> net = mumoe.cp(128, 768, 1000, rank=64)
>>> net.n_params
121408
"""

from mumoe.budget import Budget
from mumoe.build import build_network
from mumoe.formats import FORMATS, Format
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
    lowrank,
    mxd,
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
    "FORMATS",
    "PRESETS",
    "Budget",
    "ExpertWeight",
    "Format",
    "Network",
    "Plan",
    "PlanCache",
    "__version__",
    "build_network",
    "cp",
    "dense",
    "expert_weight",
    "forward",
    "lowrank",
    "materialize",
    "mxd",
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
