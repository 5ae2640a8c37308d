"""Plans and their cache: reuse, bounds, keys, threads."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl

from mumoe import Plan, PlanCache, cp, forward, random_cores, tr
from mumoe.plan import Planner, batch_bucket
from mumoe.testing import random_inputs


def test_a_plan_is_built_once_and_reused():
    net = cp(6, 4, expert_dims=8, rank=3)
    planner = Planner(net)
    cores = random_cores(net, random_state=0)
    x, gates = random_inputs(net, (5,), random_state=0)
    first = planner.forward(5, "numpy", x.dtype)
    forward(net, cores, x, gates, planner=planner)
    forward(net, cores, x, gates, planner=planner)
    assert planner.forward(5, "numpy", x.dtype) is first
    assert planner.cache.misses == 1
    assert planner.cache.hits == 3


def test_batch_sizes_share_a_power_of_two_bucket():
    net = cp(6, 4, expert_dims=8, rank=3)
    planner = Planner(net)
    cores = random_cores(net, random_state=0)
    for batch in range(5, 9):
        x, gates = random_inputs(net, (batch,), random_state=batch)
        forward(net, cores, x, gates, planner=planner)
    assert planner.cache.keys() == [("forward", 8, "numpy", np.dtype("float64"))]
    x, gates = random_inputs(net, (9,), random_state=0)
    forward(net, cores, x, gates, planner=planner)
    assert planner.cache.keys()[-1] == ("forward", 16, "numpy", np.dtype("float64"))


def test_dtype_is_part_of_the_key():
    net = cp(6, 4, expert_dims=8, rank=3)
    planner = Planner(net)
    for dtype in (tl.float64, tl.float32):
        cores = random_cores(net, random_state=0, dtype=dtype)
        x, gates = random_inputs(net, (4,), random_state=0, dtype=dtype)
        assert forward(net, cores, x, gates, planner=planner).dtype == dtype
    assert [k[3] for k in planner.cache.keys()] == [np.dtype("float64"), np.dtype("float32")]


def test_cache_is_bounded_and_least_recently_used():
    cache = PlanCache(maxsize=2)
    build = lambda: Plan.build("ab,b->a", [(2, 3), (3,)])  # noqa: E731
    a = cache.get("a", build)
    cache.get("b", build)
    assert cache.get("a", build) is a  # refreshes "a"
    cache.get("c", build)  # evicts "b"
    assert cache.keys() == ["a", "c"]
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 3)
    assert repr(cache) == "PlanCache(size=2, maxsize=2, hits=1, misses=3)"
    cache.clear()
    assert len(cache) == 0 and cache.hits == cache.misses == 0


@pytest.mark.parametrize(
    ("maxsize", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_cache_size_must_be_a_positive_int(maxsize, error):
    with pytest.raises(error, match="maxsize must be a positive int"):
        PlanCache(maxsize)


def test_plan_reports_its_path_and_cost():
    plan = Plan.build("ab,bc,cd->ad", [(10, 20), (20, 30), (30, 5)])
    assert plan.path in (((0, 1), (0, 1)), ((1, 2), (0, 1)))
    assert plan.flops > 0 and plan.largest_intermediate > 0
    assert len(plan.step_equations) == 2
    a, b, c = (np.random.default_rng(0).standard_normal(s) for s in plan.shapes)
    np.testing.assert_allclose(plan(a, b, c), a @ b @ c)


def test_plan_runs_at_sizes_other_than_it_was_searched_for():
    plan = Plan.build("ab,bc->ac", [(16, 4), (4, 3)])
    a, b = np.ones((5, 4)), np.ones((4, 3))
    np.testing.assert_array_equal(plan(a, b), a @ b)


@pytest.mark.parametrize(("batch", "bucket"), [(0, 1), (1, 1), (2, 2), (3, 4), (1000, 1024)])
def test_batch_bucket(batch, bucket):
    assert batch_bucket(batch) == bucket


def test_path_searches_leave_pythons_random_state_alone():
    # opt_einsum's random-greedy search reseeds the global generator (issue #15, item 10).
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    Plan.build("ab,bc,cd->ad", [(3, 4), (4, 5), (5, 6)], optimize="random-greedy-128")
    net = tr(6, 5, expert_dims=(4, 3, 2), rank=2)
    planner = Planner(net, autotune=True)  # autotune times random-greedy too
    cores = random_cores(net, random_state=0)
    x, gates = random_inputs(net, (4,), random_state=0)
    forward(net, cores, x, gates, planner=planner)
    assert random.random() == expected


def test_a_thread_drawing_from_random_during_a_search_draws_each_number_once():
    # Issue #26, item 12: the search saved and restored the global state around itself,
    # so a thread drawing meanwhile had its draws repeated (1,150,456 of 6,024,250).
    import random
    import threading

    random.seed(7)
    reference = [random.random() for _ in range(200_000)]
    random.seed(7)
    drawn, done = [], threading.Event()

    def draw():
        while not done.is_set() and len(drawn) < len(reference):
            drawn.append(random.random())

    thread = threading.Thread(target=draw)
    thread.start()
    try:
        for k in range(40):
            Plan.build(
                "ab,bc,cd,de->ae",
                [(3, 4), (4, 5), (5, 6), (6, 2 + k % 3)],
                optimize="random-greedy-128",
            )
    finally:
        done.set()
        thread.join()
    assert drawn == reference[: len(drawn)]
