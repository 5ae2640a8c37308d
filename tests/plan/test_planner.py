"""Planners: one per network and policy, autotuning, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given

from mumoe import Network, cp, forward, materialize, planner_of, random_cores, tr
from mumoe.plan import Planner
from mumoe.testing import assert_close, custom_networks, dense_forward, random_inputs


@given(custom_networks())
def test_equal_arguments_make_equal_networks_that_share_a_planner(net):
    twin = Network(
        net.spec,
        net.in_features,
        net.out_features,
        expert_dims=net.expert_dims,
        rank=dict(net.ranks) or None,
        bias=net.bias,
        in_shape=net.in_shape,
        out_shape=net.out_shape,
    )
    assert twin == net and hash(twin) == hash(net) and twin is not net
    assert planner_of(twin) is planner_of(net)


def test_a_pickled_planner_keeps_its_policy_but_not_its_plans():
    net = cp(5, 2, expert_dims=8, rank=3)
    planner = Planner(net, cache_size=4, autotune=True, optimize="greedy")
    planner.forward(4, "numpy", np.dtype("float64"))
    copy = pickle.loads(pickle.dumps(planner))
    assert copy.network == net and copy is not planner
    assert copy is planner_of(net, cache_size=4, autotune=True, optimize="greedy")
    assert (copy.optimize, copy.autotune, copy.cache.maxsize) == ("greedy", True, 4)
    assert not any(key[:2] == ("forward", 4) for key in copy.cache.keys())


def test_autotune_times_each_distinct_path_and_keeps_the_fastest():
    planner = Planner(tr(16, 10, expert_dims=(8, 4), rank=3), autotune=True)
    timed = []

    def timer(plan):
        timed.append(plan.path)
        return len(timed)  # the first candidate is the "fastest"

    chosen = planner.forward(64, "numpy", np.dtype("float64"), timer)
    assert len(timed) == len(set(timed)) >= 1
    assert chosen.path == timed[0]
    assert planner.forward(64, "numpy", np.dtype("float64"), timer) is chosen  # cached
    assert len(timed) == len(set(timed))


def test_autotuned_forward_computes_eq1():
    net = tr(16, 10, expert_dims=(8, 4), rank=3)
    planner = Planner(net, autotune=True)
    cores = random_cores(net, random_state=0)
    x, gates = random_inputs(net, (20,), random_state=1)
    expected = dense_forward(materialize(net, cores), x, gates, True)
    assert_close(forward(net, cores, x, gates, planner=planner), expected, "float64", scale=1000)
    assert len(planner.cache) == 1  # the tuned forward plan (materialize used the default's)


def test_autotuned_plans_are_kept_per_device():
    # A path timed on one device is not reused on another: the device is in the key.
    net = tr(16, 10, expert_dims=(8, 4), rank=3)
    planner = Planner(net, autotune=True)
    cores = random_cores(net, random_state=0)
    x, gates = random_inputs(net, (20,), random_state=1)
    forward(net, cores, x, gates, planner=planner)
    (key,) = [k for k in planner.cache.keys() if k[0] == "forward"]
    assert key[-1] == "cpu"
    timed = []
    dtype = np.dtype("float64")
    other = planner.forward(20, "numpy", dtype, lambda p: timed.append(p) or 0.0, "cuda:0")
    assert timed and other is not planner.cache.peek(key)
    assert ("forward", 32, "numpy", dtype, "cuda:0") in planner.cache.keys()


def test_autotune_must_be_a_bool():
    with pytest.raises(TypeError, match="autotune must be True or False"):
        planner_of(Network("n r, i r, o r", 3, 2, expert_dims=4, rank=2), autotune="yes")


def test_a_planners_cache_respects_its_bound():
    net = cp(3, 2, expert_dims=4, rank=2)
    planner = Planner(net, cache_size=3)
    cores = random_cores(net, random_state=0)
    for batch in (1, 2, 4, 8, 16, 32):
        x, gates = random_inputs(net, (batch,), random_state=0)
        forward(net, cores, x, gates, planner=planner)
    assert len(planner.cache) == 3
    assert [k[1] for k in planner.cache.keys()] == [8, 16, 32]
