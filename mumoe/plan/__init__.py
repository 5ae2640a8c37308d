"""How to contract a network: exact paths, compiled programs, cached plans, and their reports.

A :class:`Plan` is one einsum equation compiled for one shape: a contraction
path (the FLOP-optimal one by default, :class:`FlopOptimal`) compiled into a
:class:`Program` of matrix multiplies with fixed layouts.  A :class:`Planner`
holds a network's plans in a bounded :class:`PlanCache`, with its path
policy (optimiser, autotuning), and :func:`planner_of` keeps one per
network and policy; :func:`flops` and :func:`describe` report the plan a
call uses.
"""

from mumoe.plan._describe import describe
from mumoe.plan._paths import (
    DEFAULT_OPTIMIZE,
    OPTIMAL_OPERANDS,
    SEARCH_SECONDS,
    FlopOptimal,
    check_optimize,
    optimal_path,
    path_optimizer,
)
from mumoe.plan._plan import (
    BIAS_INSIDE_ROWS,
    BIAS_KERNEL_ELEMENTS,
    Plan,
    PlanCache,
    PlanTooLargeError,
    batch_bucket,
)
from mumoe.plan._planner import (
    AUTOTUNE_OPTIMIZERS,
    MEMORY_LIMIT,
    PLANNERS_KEPT,
    Planner,
    flops,
    planner_of,
    resolve_planner,
)
from mumoe.plan._program import (
    Kernels,
    PairStep,
    Program,
    SumStep,
    backend_kernels,
    compile_program,
)
from mumoe.plan._sparse import SparseLayout, check_crossover, expert_widths, sparse_layout

__all__ = [
    "AUTOTUNE_OPTIMIZERS",
    "BIAS_INSIDE_ROWS",
    "BIAS_KERNEL_ELEMENTS",
    "DEFAULT_OPTIMIZE",
    "MEMORY_LIMIT",
    "OPTIMAL_OPERANDS",
    "PLANNERS_KEPT",
    "SEARCH_SECONDS",
    "FlopOptimal",
    "Kernels",
    "PairStep",
    "Plan",
    "PlanCache",
    "PlanTooLargeError",
    "Planner",
    "Program",
    "SparseLayout",
    "SumStep",
    "backend_kernels",
    "batch_bucket",
    "check_crossover",
    "check_optimize",
    "compile_program",
    "describe",
    "expert_widths",
    "flops",
    "optimal_path",
    "path_optimizer",
    "planner_of",
    "resolve_planner",
    "sparse_layout",
]
