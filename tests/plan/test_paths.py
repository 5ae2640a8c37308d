"""FLOP-optimal paths (mumoe.plan): as cheap as opt_einsum's exhaustive search, always."""

from __future__ import annotations

import numpy as np
import opt_einsum
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mumoe import Network, describe, planner_of, tr, tucker
from mumoe.plan import DEFAULT_OPTIMIZE, OPTIMAL_OPERANDS, FlopOptimal, optimal_path
from mumoe.testing import networks


def cost(equation, shapes, optimize):
    return int(
        opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimize)[1].opt_cost
    )


@st.composite
def equations(draw, max_operands=6, lone=False):
    """Random einsum problems as networks make them: shared, open and hyper-legs, outer products.

    Every summed leg is held by two operands or more, as in any :class:`mumoe.Network`
    (a bond must join two cores), unless ``lone``: then a leg one operand alone holds
    may be summed too (a general einsum's, which a single-operand step sums first).
    """
    letters = "abcdefgh"
    n = draw(st.integers(2, max_operands))
    terms = [
        "".join(draw(st.lists(st.sampled_from(letters), min_size=1, max_size=3, unique=True)))
        for _ in range(n)
    ]
    used = sorted(set("".join(terms)))
    output = "".join(draw(st.lists(st.sampled_from(used), max_size=3, unique=True)))
    if not lone:
        alone = {leg for leg in used if "".join(terms).count(leg) == 1}
        output += "".join(sorted(alone - set(output)))
    sizes = {leg: draw(st.integers(1, 6)) for leg in used}
    shapes = [tuple(sizes[leg] for leg in term) for term in terms]
    return f"{','.join(terms)}->{output}", shapes


def every_path(n):
    """Every pairwise contraction sequence of ``n`` operands (opt_einsum's convention)."""
    if n == 1:
        yield []
        return
    for i in range(n):
        for j in range(i + 1, n):
            for rest in every_path(n - 1):
                yield [(i, j), *rest]


@settings(max_examples=150)
@given(equations(max_operands=5))
def test_the_path_is_the_cheapest_of_all_paths(problem):
    # The oracle: every contraction sequence, costed by opt_einsum itself.
    equation, shapes = problem
    ours = cost(equation, shapes, FlopOptimal())
    n = len(shapes)
    assert ours == min(cost(equation, shapes, path) for path in every_path(n))
    # opt_einsum's own searches are never cheaper; "optimal" can be dearer, since its
    # search ignores the sum over a leg only one operand holds, which opt_cost counts.
    assert ours <= cost(equation, shapes, "optimal")
    assert ours <= cost(equation, shapes, "auto-hq")


@settings(max_examples=60)
@given(equations(max_operands=7))
def test_the_path_is_never_dearer_than_the_exhaustive_search(problem):
    equation, shapes = problem
    ours = cost(equation, shapes, FlopOptimal())
    assert ours <= cost(equation, shapes, "optimal")
    assert ours <= cost(equation, shapes, "auto-hq")


def test_a_leg_one_operand_alone_sums_is_summed_first():
    # Issue #26, item 9: "abc,cd,de->e" cost 19.7x what opt_einsum's "dp" finds.
    shapes = [(9, 9, 9), (9, 9), (9, 9)]
    assert cost("abc,cd,de->e", shapes, FlopOptimal()) == cost("abc,cd,de->e", shapes, "dp")


@settings(max_examples=100)
@given(equations(max_operands=6, lone=True))
def test_general_einsums_are_never_dearer_than_opt_einsums_searches(problem):
    equation, shapes = problem
    ours = cost(equation, shapes, FlopOptimal())
    for optimize in ("dp", "optimal", "auto-hq", "greedy"):
        assert ours <= cost(equation, shapes, optimize), optimize
    if len(shapes) <= 4:
        assert ours <= min(cost(equation, shapes, path) for path in every_path(len(shapes)))
    operands = [np.random.default_rng(0).random(shape) for shape in shapes]
    np.testing.assert_allclose(
        opt_einsum.contract(equation, *operands, optimize=FlopOptimal()),
        np.einsum(equation, *operands),
        rtol=1e-12,
    )


def intermediates(equation, shapes, path):
    """The entries of each intermediate a path makes, the result aside."""
    info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=path)[1]
    return info.size_list[:-1]


@settings(max_examples=80)
@given(equations(max_operands=5), st.integers(1, 300))
def test_the_memory_limit_is_honoured_by_the_cheapest_path_within_it(problem, limit):
    # Issue #26, item 9: memory_limit was ignored up to 10 operands.
    equation, shapes = problem
    fitting = [
        cost(equation, shapes, path)
        for path in every_path(len(shapes))
        if max(intermediates(equation, shapes, path), default=0) <= limit
    ]
    optimizer = FlopOptimal()
    if not fitting:
        with pytest.raises(ValueError, match=f"within memory_limit={limit:,} entries"):
            opt_einsum.contract_path(
                equation, *shapes, shapes=True, optimize=optimizer, memory_limit=limit
            )
        return
    _, info = opt_einsum.contract_path(
        equation, *shapes, shapes=True, optimize=optimizer, memory_limit=limit
    )
    assert max(info.size_list[:-1], default=0) <= limit
    assert int(info.opt_cost) == min(fitting)


@settings(max_examples=30)
@given(networks(), st.sampled_from([1, 8, 256]))
def test_network_plans_are_flop_optimal(net, rows):
    # Presets and custom specs, open hyperedges included, at the default optimiser.
    shapes = net.forward_shapes(rows)
    assume(len(shapes) <= 7)  # the exhaustive search takes seconds beyond
    plan = planner_of(net).build_forward(rows)
    assert planner_of(net).optimize == DEFAULT_OPTIMIZE
    assert plan.flops <= cost(net.einsum_equation, shapes, "optimal")
    if len(shapes) <= 5:
        every = every_path(len(shapes))
        assert plan.flops == min(cost(net.einsum_equation, shapes, path) for path in every)


@pytest.mark.parametrize(
    ("net", "auto_hq_excess"),
    [
        (tucker(16, 8, expert_dims=(4, 3), rank=(2, 3, 4, 4)), 0.08),  # 8 operands
        (tucker(768, 1000, expert_dims=(8, 8), rank=(8, 8, 64, 64)), 0.009),
        (tr(10, 10, expert_dims=(4, 3, 2), rank=3), 0.04),  # 9 operands
        (tucker(10, 10, expert_dims=(4, 3, 2), rank=3), 0.2),  # 10 operands
    ],
    ids=["tucker-2-levels-small", "tucker-2-levels-clip", "tr-3-levels", "tucker-3-levels"],
)
def test_the_cases_auto_hq_misses(net, auto_hq_excess):
    equation, shapes = net.einsum_equation, net.forward_shapes(256)
    ours = planner_of(net).build_forward(256).flops
    assert ours == cost(equation, shapes, FlopOptimal(max_operands=12))
    assert cost(equation, shapes, "auto-hq") > ours * (1 + auto_hq_excess)
    if len(shapes) <= 8:
        assert ours <= cost(equation, shapes, "optimal")


def test_past_the_limit_the_fallback_searches():
    net = tucker(10, 10, expert_dims=(4, 3, 2, 2), rank=2)  # 12 operands
    assert len(net.forward_shapes(4)) > OPTIMAL_OPERANDS
    plan = planner_of(net).build_forward(4)
    assert plan.flops == cost(net.einsum_equation, net.forward_shapes(4), "auto-hq")
    assert "dynamic programming (more than 10 operands: not proven optimal)" in describe(net, 4)


def test_small_problems_and_explicit_optimisers():
    assert optimal_path(["ab"], "a", {"a": 2, "b": 3}) == [(0,)]
    assert optimal_path([], "", {}) == []
    net = Network("n r, i r, o r", 5, 2, expert_dims=8, rank=3)
    assert "opt_einsum 'greedy'" in describe(net, 4, planner=planner_of(net, optimize="greedy"))
