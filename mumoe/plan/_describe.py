"""Readable accounts of a network: :func:`describe` (what ``mumoe describe`` prints).

The report reads everything from the network and its planner: the sizes and
cores, the equation, the path the forward pass uses for the batch size asked
(the autotuned one once a call has timed it, see
:meth:`Planner.chosen <mumoe.plan.Planner.chosen>`), its FLOPs, and how the
bias is added, from the bias rule of :meth:`Plan.bias_inside
<mumoe.plan.Plan.bias_inside>`, and the largest intermediate against the
planner's memory budget (a network over it is described along the path it
would take without one).  Given the support size of each level (``support=``,
a top-k gate's ``k``), it says which levels a call contracts sparsely, and
why, with the sparse path and its FLOPs against the dense ones.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import opt_einsum
import tensorly as tl

from mumoe.backends import sparse_min_work
from mumoe.plan._paths import DEFAULT_OPTIMIZE, OPTIMAL_OPERANDS
from mumoe.plan._plan import (
    BIAS_INSIDE_ROWS,
    BIAS_KERNEL_ELEMENTS,
    Plan,
    PlanTooLargeError,
    batch_bucket,
)
from mumoe.plan._planner import Planner, resolve_planner
from mumoe.plan._program import PairStep
from mumoe.plan._sizes import bytes_text, dtype_text, itemsize
from mumoe.plan._sparse import expert_widths, sparse_layout
from mumoe.spec import Network
from mumoe.validation import positive_int

__all__ = ["describe"]


def describe(
    network: Network,
    batch_size: int = 1,
    *,
    planner: Planner | None = None,
    backend: str | None = None,
    dtype: Hashable = None,
    support: int | Sequence[int] | None = None,
    training: bool = False,
) -> str:
    """A readable account of ``network``: sizes, cores, equation, path and costs.

    Parameters
    ----------
    network : Network
    batch_size : int, default 1
        The batch size the path and FLOPs are reported for.
    planner : Planner, optional
        Whose plans to report; :func:`~mumoe.plan.planner_of` ``(network)``
        by default, the planner of :func:`mumoe.forward`.
    backend, dtype : optional
        Report the plan cached for this backend and dtype (by default the
        one used most recently for the batch size, else the one a call would
        build).  The sparse crossover is the backend's (the active one by
        default).
    support : int or sequence of int, optional
        Entries per row of each level's support (a top-k gate's ``k``; one
        int for every level): report which levels a call given such
        supports (:class:`~mumoe.typing.SparseGate`) contracts sparsely, by
        gathering rows of their cores, and which densely, and why, with the
        sparse path and its FLOPs.
    training : bool, default False
        With ``support``: whether gradients flow to the cores (the crossover
        differs).

    Returns
    -------
    str

    Examples
    --------
    >>> from mumoe import cp
    >>> print(describe(cp(5, 2, expert_dims=8, rank=3), batch_size=4))  # doctest: +ELLIPSIS
    Network 'cp': 1 expert level, 8 experts, with bias
      spec        n1 r, i r, o r
      ...
      path        batch 4, FLOP-optimal:
                  (1) gate n1 * core 0: ...
    >>> print(describe(cp(64, 2, expert_dims=4096, rank=8), batch_size=256, support=32,
    ...                backend="numpy"))  # doctest: +ELLIPSIS
    Network 'cp': 1 expert level, 4,096 experts, with bias
    ...
      sparse      n1: k = 32 of 4,096 (k/N = 0.0078 <= crossover 0.03, numpy, ...): sparse, ...
                  path batch 256:
                  (1) input * core 1: ac,ce->ae  [matmul]
                  (2) gather(core 0, n1) * (1): ae,ae->ae  [hadamard]
                  (3) (2) * core 2: ae,ed->ad  [matmul]
                  FLOPs 407,552 for batch 256 (gathers 131,072): 98% fewer than ...
    """
    net = network
    planner = resolve_planner(network, planner)
    batch_size = positive_int(batch_size, "batch_size")
    try:
        plan, source = planner.chosen(batch_size, backend, dtype)
        over: PlanTooLargeError | None = None
    except PlanTooLargeError as error:  # described all the same: the path without a budget
        over = error
        unbudgeted = Planner(network, optimize=planner.optimize, memory_limit=None)
        plan, source = unbudgeted.build_forward(batch_bucket(batch_size)), "not built yet"
    levels = f"{net.n_levels} expert level{'s' if net.n_levels > 1 else ''}"
    experts = f"{net.n_experts:,} experts"
    if net.n_levels > 1:
        experts = f"{' x '.join(map(str, net.expert_dims))} = {experts}"
    sizes = [f"{leg}={net.sizes[leg]}" for leg in net.expert_legs]
    first, *others = net.input_legs
    in_size = f"{first}={net.sizes[first]}"
    if net.bias:
        in_size += f" ({net.in_shape[0]} + bias)"
    sizes += [in_size, *(f"{leg}={net.sizes[leg]}" for leg in others)]
    sizes += [f"{leg}={net.sizes[leg]}" for leg in net.output_legs]
    sizes += [f"{bond}={size}" for bond, size in net.ranks.items()]

    width = max(len(" ".join(legs)) for legs in net.core_legs)
    cores = [
        f"#{k} {' '.join(legs):<{width}}  {shape!s:<18} {math.prod(shape):>12,}"
        for k, (legs, shape) in enumerate(zip(net.core_legs, net.core_shapes, strict=True))
    ]
    ratio = net.n_dense_params / net.n_params
    pad = "\n" + " " * 14
    optimizer = plan.search or f"opt_einsum {planner.optimize!r}"
    if planner.optimize == DEFAULT_OPTIMIZE and not optimizer.startswith("FLOP-optimal"):
        optimizer += f" (more than {OPTIMAL_OPERANDS} operands: not proven optimal)"
    if source == "autotuned":
        optimizer = "autotuned (the fastest candidate timed on the first call)"
    elif planner.autotune:
        optimizer += " (autotune: not timed yet; a first call may choose another path)"
    # One count along the plan's path gives the FLOPs (as planner.flops) and the sizes.
    _, info = opt_einsum.contract_path(
        net.einsum_equation, *net.forward_shapes(batch_size), shapes=True, optimize=list(plan.path)
    )
    lines = [
        f"Network '{net.format}': {levels}, {experts}, {'with' if net.bias else 'no'} bias",
        f"  spec        {net.spec}",
        f"  sizes       {', '.join(sizes)}",
        f"  cores       {pad.join(cores)}",
        f"  parameters  {net.n_params:,} (dense W {net.weight_shape}: "
        f"{net.n_dense_params:,}, {ratio:,.1f}x more)",
        f"  equation    {net.equation}",
        f"  einsum      {net.einsum_equation}",
        f"  path        batch {batch_size}, {optimizer}:{pad}"
        + pad.join(_steps(_operand_names(net), plan)),
        f"  FLOPs       {int(info.opt_cost):,} for batch {batch_size}",
        f"  memory      {_memory_text(planner, info, dtype, over)}",
        f"  bias        {_bias_text(net, plan, batch_size)}",
    ]
    if support is not None:
        lines += _sparse_lines(
            planner, batch_size, support, backend or tl.get_backend(), training, int(info.opt_cost)
        )
    return "\n".join(lines)


def _sparse_lines(
    planner: Planner,
    batch_size: int,
    support: int | Sequence[int],
    backend: str,
    training: bool,
    dense_flops: int,
) -> list[str]:
    # Which levels a call with supports of these sizes contracts sparsely, its path, its FLOPs.
    net = planner.network
    ks = [support] * net.n_levels if isinstance(support, int) else list(support)
    if len(ks) != net.n_levels or not all(isinstance(k, int) and k >= 1 for k in ks):
        raise ValueError(
            f"support must give a positive number of entries for each of the "
            f"{net.n_levels} level(s), got {support!r}"
        )
    for leg, n, k in zip(net.expert_legs, net.expert_dims, ks, strict=True):
        if k > n:
            raise ValueError(
                f"a support of {leg} holds at most its {n} experts, got {k} entries a row"
            )
    limit = planner.max_density(backend, training)
    pad = "\n" + " " * 14
    where = f"{backend}, {'with' if training else 'without'} gradients to the cores"
    levels, notes = [], []
    for e, (leg, n, k) in enumerate(zip(net.expert_legs, net.expert_dims, ks, strict=True)):
        density = k / n
        if density <= limit and planner.worth_gathering(e, batch_size, backend, training):
            levels.append(e)
            notes.append(f"{leg}: k = {k:,} of {n:,} (k/N = {density:.4f} <= crossover {limit:.4g}")
        elif density <= limit:
            work = batch_size * n * expert_widths(net)[e]
            notes.append(
                f"{leg}: k = {k:,} of {n:,} (k/N = {density:.4f} <= crossover {limit:.4g}): "
                f"dense, its dense step ({work:,} multiply-adds) is below {backend}'s floor of "
                f"{sparse_min_work(backend, training):,}, where a gather's fixed cost outweighs it"
            )
        else:
            notes.append(
                f"{leg}: k = {k:,} of {n:,} (k/N = {density:.4f} > crossover {limit:.4g}, "
                f"{where}): dense, the support scattered into a (B, {n:,}) matrix"
            )
    if not levels:
        return [f"  sparse      {pad.join(notes)}"]
    layout = sparse_layout(net, tuple(levels))
    fused = {c: e for c, e, _ in layout.fused}
    gathered = dict(layout.gathered)
    for e in levels:
        cores = [c for c, f in fused.items() if f == e]
        how = (
            f"core {cores[0]} gathered and summed (embedding-bag style)"
            if cores
            else "cores "
            + ", ".join(str(c) for c, pairs in gathered.items() if any(f == e for f, _ in pairs))
            + " gathered"
        )
        notes[e] += f", {where}): sparse, {how}"
    sizes = {e: ks[e] for e in levels}
    # The plan a call builds (at the batch bucket, and the bucket of k where k enters the
    # path), without the backend's kernels (importing them could need torch): they change
    # how the steps run, not the path.
    searched = {e: batch_bucket(k) if e in layout.value_levels else k for e, k in sizes.items()}
    plan = planner._build_sparse(layout, batch_bucket(batch_size), searched, None, None)
    shapes = layout.shapes(net, batch_size, sizes)
    _, info = opt_einsum.contract_path(
        layout.equation, *shapes, shapes=True, optimize=list(plan.path)
    )
    gather = 2 * sum(
        batch_size * sizes[e] * math.prod(net.core_shapes[c]) // net.expert_dims[e]
        for c, e in fused.items()
    )
    total = int(info.opt_cost) + gather
    names = [f"gate {net.expert_legs[e]}" for e in layout.dense_levels]
    names += [f"values {net.expert_legs[e]}" for e in layout.value_levels]
    names.append("input")
    for c in range(net.n_cores):
        if c in fused:
            names.append(f"gather(core {c}, {net.expert_legs[fused[c]]})")
        elif c in gathered:
            names.append(f"core {c}[support]")
        else:
            names.append(f"core {c}")
    steps = _steps(names, plan)
    saved = 1 - total / dense_flops if dense_flops else 0.0
    return [
        f"  sparse      {pad.join(notes)}",
        f"              path batch {batch_size}:{pad}" + pad.join(steps),
        f"              FLOPs {total:,} for batch {batch_size} (gathers {gather:,}): "
        f"{saved:.0%} fewer than the dense path's {dense_flops:,}",
    ]


def _operand_names(net: Network) -> list[str]:
    # The forward contraction's operands as the path report names them.
    return [
        *(f"gate {leg}" for leg in net.expert_legs),
        "input",
        *(f"core {k}" for k in range(net.n_cores)),
    ]


def _steps(names: list[str], plan: Plan) -> list[str]:
    # Each pairwise step of the plan's path, its operands named (``names`` is consumed).
    steps = []
    for n, (contraction, step) in enumerate(zip(plan.path, plan.program.steps, strict=True), 1):
        order = (step.left, step.right) if isinstance(step, PairStep) else contraction
        picked = [names[j] for j in order]
        for j in sorted(contraction, reverse=True):
            del names[j]
        names.append(f"({n})")
        kind = step.kind if isinstance(step, PairStep) else "sum"
        steps.append(f"({n}) {' * '.join(picked)}: {step.equation}  [{kind}]")
    return steps


def _memory_text(
    planner: Planner, info: Any, dtype: Hashable, over: PlanTooLargeError | None
) -> str:
    # The largest intermediate of the path (opt_einsum's PathInfo), and the budget.
    sizes = [int(size) for size in info.size_list]
    largest = max(sizes)
    step = sizes.index(largest) + 1
    size = itemsize(dtype)
    text = (
        f"largest intermediate {largest:,} entries ({bytes_text(largest * size)} "
        f"{dtype_text(dtype)}), step ({step})"
    )
    if planner.memory_limit is None:
        return text + "; no memory budget"
    budget = f"budget {bytes_text(planner.memory_limit)} an intermediate"
    if over is not None:
        return f"{text}; over the {budget}, so a call raises PlanTooLargeError: {over.reason}"
    return f"{text}; {budget}"


def _bias_text(net: Network, plan: Plan, batch_size: int) -> str:
    # Which branch of the bias rule this batch takes, then the rule itself.
    if not net.bias:
        return "none"
    if net.splits_input:
        return (
            f"a slice of {net.input_legs[0]}, one at its index {net.in_shape[0]} and 0 of the "
            "other input legs (the split input's bias)"
        )
    program = plan.bias_program
    if program is None:
        return "a column of ones concatenated to x (the path meets x before its core)"
    step = next(k for k, s in enumerate(program.steps, 1) if isinstance(s, PairStep) and s.bias)
    inside = f"x @ core[:I] + core[I] in step ({step})"
    rows = BIAS_INSIDE_ROWS * program.bias_width + 1
    if program.kernels.bias_matmul is not None:
        kernel_rows = -(-BIAS_KERNEL_ELEMENTS // program.bias_features)
        rule = f"by the bias_matmul kernel from {min(rows, kernel_rows):,} rows"
    else:
        rule = f"from {rows:,} rows"
    if plan.bias_inside(batch_size, differentiable=True):
        kernel = " (with them by the bias_matmul kernel)" if program.kernels.bias_matmul else ""
        return f"for batch {batch_size}: {inside}, with or without gradients to the cores{kernel}"
    return (
        f"for batch {batch_size}: {inside} without gradients to the cores; with them a column "
        f"of ones (the split {rule})"
    )
