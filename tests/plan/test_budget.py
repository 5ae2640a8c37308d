"""Memory and time budgets of plans: checked before anything is allocated or searched long."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import opt_einsum
import pytest

from mumoe import Network, describe, forward, tucker
from mumoe.cli import main
from mumoe.plan import (
    MEMORY_LIMIT,
    FlopOptimal,
    Plan,
    Planner,
    PlanTooLargeError,
    _paths,
    planner_of,
)


def complete_graph(k: int) -> str:
    """A spec of ``k`` cores, each pair joined by a bond (issue #26's hostile file)."""
    legs: list[list[str]] = [[] for _ in range(k)]
    for a in range(k):
        for b in range(a + 1, k):
            legs[a].append(f"b{a}_{b}")
            legs[b].append(f"b{a}_{b}")
    legs[0].append("n")
    legs[1].append("i")
    legs[2].append("o")
    return ", ".join(" ".join(core) for core in legs)


def test_a_network_no_path_contracts_within_budget_is_refused_before_allocating():
    # Issue #26, item 12: a complete graph of cores loaded in no time, then tried to
    # allocate 16 GiB at its first call.  Six cores at rank 8: every order holds at
    # least 8**9 entries (a cut of 3 cores from 3).
    net = Network(complete_graph(6), 8, 8, expert_dims=4, rank=8)
    cores = [np.ones(shape) for shape in net.core_shapes]  # 32,768 entries each
    gates = [np.full((2, 4), 0.25)]
    planner = Planner(net, memory_limit=1 << 24)  # 16 MiB
    with pytest.raises(PlanTooLargeError) as caught:
        forward(net, cores, np.ones((2, 8)), gates, planner=planner)
    error = caught.value
    assert isinstance(error, MemoryError)
    assert error.needed >= 8**9 > error.limit == (1 << 24) // 8
    message = str(error)
    assert "custom network (6 cores, 15 bonds" in message and "at batch 2" in message
    assert f"{error.needed:,} entries" in message and "GiB in float64" in message
    assert "16.0 MiB" in message and "no contraction order keeps within it" in message
    assert "memory_limit=" in message
    assert not planner.cache.keys()  # nothing kept


def test_the_cheapest_path_within_budget_is_taken_where_the_cheapest_is_over():
    net = tucker(16, 4, expert_dims=(4, 4), rank=8)
    equation, shapes = net.einsum_equation, net.forward_shapes(8)
    cheapest = Plan.build(equation, shapes)
    within = Plan.build(equation, shapes, memory_limit=cheapest.largest_intermediate - 1)
    assert within.largest_intermediate < cheapest.largest_intermediate
    assert within.flops > cheapest.flops
    assert within.search == "FLOP-optimal, within the memory limit"
    # The least FLOPs among the paths within the limit: opt_einsum's exhaustive search agrees.
    _, info = opt_einsum.contract_path(
        equation,
        *shapes,
        shapes=True,
        optimize="optimal",
        memory_limit=cheapest.largest_intermediate - 1,
    )
    assert within.flops <= info.opt_cost
    operands = [np.random.default_rng(0).standard_normal(s) for s in shapes]
    np.testing.assert_allclose(within(*operands), cheapest(*operands), rtol=1e-12)


def test_a_budget_never_refuses_the_result_or_an_operand():
    # W itself, materialised, is the contraction's result: it exists anyway.
    net = tucker(64, 64, expert_dims=(32, 32), rank=2)
    planner = Planner(net, memory_limit=1024)
    plan = planner.materialize("numpy", np.dtype("float64"))  # builds the plan, allocates nothing
    assert plan.largest_intermediate >= np.prod(net.weight_shape)
    assert planner.forward(256, "numpy", np.dtype("float64")).largest_intermediate >= 256 * 64


def test_an_explicit_path_over_budget_is_refused_as_given():
    equation, shapes = "ab,bc,cd->ad", [(100, 2), (2, 100), (100, 2)]
    with pytest.raises(PlanTooLargeError, match="the path given holds more"):
        Plan.build(equation, shapes, [(0, 1), (0, 1)], memory_limit=1000)
    assert Plan.build(equation, shapes, [(1, 2), (0, 1)], memory_limit=1000).path == (
        (1, 2),
        (0, 1),
    )


def test_autotune_does_not_time_candidates_over_budget():
    # Issue #26, item 12: autotune on this layer at batch 4096 allocated 4 GiB (opt_einsum's
    # greedy path, 44x the FLOPs) where the default plan peaks at 16 MiB.
    net = tucker(1024, 1024, expert_dims=(128, 128), rank=16)
    planner = Planner(net, autotune=True)
    timed = []

    def timer(plan):  # no operand is allocated: the candidates are only looked at
        timed.append(plan)
        return float(plan.flops)

    planner.forward(4096, "numpy", np.dtype("float32"), timer)
    greedy = planner.build_forward(4096, "greedy")
    assert greedy.largest_intermediate * 4 > MEMORY_LIMIT  # 4 GiB
    assert timed and all(p.largest_intermediate * 4 <= MEMORY_LIMIT for p in timed)
    assert greedy.path not in {p.path for p in timed}


def test_the_time_budget_stops_a_search_that_would_take_minutes(monkeypatch):
    # Issue #26, item 12: 14 cores searched for more than 100 s, 12 for 14 s.  Past the
    # budget the search keeps a random-greedy path, and says so.
    monkeypatch.setattr(_paths, "SEARCH_SECONDS", 0.2)
    net = Network(complete_graph(12), 16, 16, expert_dims=8, rank=2)
    optimizer = FlopOptimal()
    with pytest.warns(UserWarning, match=r"passed its 0.2 s budget.*random-greedy"):
        path, _ = opt_einsum.contract_path(
            net.einsum_equation, *net.forward_shapes(1), shapes=True, optimize=optimizer
        )
    assert optimizer.search == "random-greedy" and len(path) == len(net.forward_shapes(1)) - 1
    # Through a planner, the first call is refused, the search having stopped at its budget.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(PlanTooLargeError, match="the random-greedy search found no path"):
            planner_of(net).build_forward(1)


def test_the_dynamic_programming_search_knows_when_no_path_fits():
    # Past OPTIMAL_OPERANDS, opt_einsum's dynamic programming with FlopOptimal's deadline;
    # a limit no path meets ends it (a callable cost turns off opt_einsum's own end).
    net = tucker(10, 10, expert_dims=(4, 3, 2, 2), rank=4)  # 12 operands
    equation, shapes = net.einsum_equation, net.forward_shapes(4)
    optimizer = FlopOptimal()
    opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimizer)
    assert optimizer.search == "dynamic programming"
    with pytest.raises(ValueError, match="no pairwise contraction path keeps every"):
        opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimizer, memory_limit=8)
    assert (
        opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=FlopOptimal())[1].opt_cost
        == opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="dp")[1].opt_cost
    )


def test_describe_shows_the_largest_intermediate_and_a_network_over_budget():
    net = tucker(16, 4, expert_dims=(4, 4), rank=8)
    text = describe(net, batch_size=8, dtype=np.dtype("float32"))
    assert "memory      largest intermediate 2,048 entries (8.0 KiB in float32)" in text
    assert "budget 2.0 GiB an intermediate" in text
    big = Network(complete_graph(6), 8, 8, expert_dims=4, rank=8)
    text = describe(big, planner=Planner(big, memory_limit=1 << 24))
    assert "over the budget 16.0 MiB an intermediate, so a call raises PlanTooLargeError" in text
    assert "no contraction order keeps within it" in text


def test_mumoe_describe_reports_a_network_over_budget(capsys):
    spec = complete_graph(6)
    argv = ["describe", spec, "--expert-dims", "4", "--in-features", "8", "--out-features", "8"]
    assert main([*argv, "--rank", "16"]) == 0
    assert "so a call raises PlanTooLargeError" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2GiB", True])
def test_the_budget_must_be_a_positive_integer(bad):
    with pytest.raises((ValueError, TypeError), match="memory_limit"):
        Planner(tucker(4, 4, expert_dims=2, rank=2), memory_limit=bad)


def test_the_budget_is_part_of_the_policy():
    net = tucker(4, 4, expert_dims=2, rank=2)
    unbounded = planner_of(net, memory_limit=None)
    assert unbounded is not planner_of(net) and unbounded.memory_limit is None
    assert planner_of(net).memory_limit == MEMORY_LIMIT
    copy = pickle.loads(pickle.dumps(Planner(net, memory_limit=1 << 20)))
    assert copy.memory_limit == 1 << 20
    assert "memory_limit=1048576" in repr(copy)


def test_a_search_time_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_seconds must be a positive number"):
        FlopOptimal(max_seconds=0)
